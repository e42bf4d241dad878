-- What runs an instance: `container` (runc) or `vm` (a QEMU micro-VM). Rows from before
-- micro-VMs are containers.
ALTER TABLE instances ADD COLUMN runtime TEXT NOT NULL DEFAULT 'container';
