-- Five roles: the former `user` keys are members.
UPDATE api_keys SET role = 'member' WHERE role = 'user';
