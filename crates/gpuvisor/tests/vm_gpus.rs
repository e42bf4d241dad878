//! GPUs for VMs through the daemon and the CLI (issue 11 item 6): a daemon simulating one GPU
//! bound to vfio-pci (`--simulate-gpus 1xH100-80GB:vfio,...`) and GPUs on the host driver.
//! `gpu list` shows the binding; a container is placed only on a host-driver GPU and is told
//! when the rest are for VMs; a VM is placed only on the vfio-pci GPU; a VM asking for a model
//! no GPU of which is bound is told how to bind one; fractions and MIG slices are refused for
//! VMs. The VM need not boot: placement and the passthrough plan are what is tested (the VM
//! runtime is a separate part; where this build has none, a VM that placement accepts is
//! refused for the missing runtime, after placement). Runs as root (CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon, SLEEP, SMALL};
use serde_json::Value;
use std::process::Output;

/// Network objects of these daemons: own prefix and pool, apart from other test binaries.
const NET: [&str; 4] = ["--net-prefix", "gf", "--net-pool", "10.79.0.0/16"];

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `instance create --image busybox` with `args` (no `--wait`), as the daemon answers it.
fn create(d: &Daemon, args: &[&str]) -> Output {
    let mut a = vec!["-o", "json", "instance", "create", "--image", "busybox"];
    // A VM is given at least 128 MiB.
    if args.windows(2).any(|w| w == ["--runtime", "vm"]) {
        a.extend([
            "--vcpus",
            "1",
            "--memory",
            "128MiB",
            "--container-disk",
            "64MiB",
        ]);
    } else {
        a.extend(SMALL);
    }
    a.extend(args);
    d.cli(&a)
}

/// A refusal: exit code `code` and every one of `says` in the message.
fn refused(out: &Output, code: i32, says: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for s in says {
        assert!(err.contains(s), "{s:?} not in: {err}");
    }
}

fn gpu<'a>(gpus: &'a Value, model: &str) -> &'a Value {
    gpus.as_array()
        .unwrap()
        .iter()
        .find(|g| g["model"] == model)
        .unwrap_or_else(|| panic!("no {model} in {gpus}"))
}

#[test]
fn vfio_gpus_are_placed_for_vms_only() {
    let _s = serial();
    let d = Daemon::start_with_gpus("1xH100-80GB:vfio,1xA100-80GB", &NET);
    d.import_busybox();

    let gpus = d.json(&["gpu", "list"]);
    let (h100, a100) = (gpu(&gpus, "H100-80GB"), gpu(&gpus, "A100-80GB"));
    assert_eq!(h100["driver"], "vfio-pci", "{gpus}");
    assert_eq!(h100["passthrough_ready"], true);
    assert!(a100.get("driver").is_none(), "{gpus}");
    assert_eq!(a100["passthrough_ready"], false);
    let (h100, a100) = (
        h100["uuid"].as_str().unwrap().to_string(),
        a100["uuid"].as_str().unwrap().to_string(),
    );

    // A container gets the GPU on the host driver, never the vfio-pci one.
    let mut args = vec!["--gpus", "1", "--wait"];
    args.extend(SLEEP);
    let c = create(&d, &args);
    assert!(c.status.success(), "{}", stderr(&c));
    let c: Value = serde_json::from_slice(&c.stdout).unwrap();
    assert_eq!(c["gpus"][0]["uuid"], a100.as_str(), "{c}");
    assert_eq!(c["state"], "running", "{c}");
    refused(
        &create(&d, &args),
        6,
        &["not enough GPUs", "1 more is bound to vfio-pci, for VMs"],
    );

    // VMs: no fraction, and no model without a GPU of it bound to vfio-pci.
    refused(
        &create(&d, &["--runtime", "vm", "--gpu-fraction", "0.5"]),
        5,
        &["a fraction of a GPU cannot be given to a VM"],
    );
    refused(
        &create(
            &d,
            &["--runtime", "vm", "--gpus", "1", "--gpu-model", "A100-80GB"],
        ),
        6,
        &[
            "not enough GPUs bound to vfio-pci for a VM: 1 A100-80GB wanted, 0 free of 0",
            "gpuvisor gpu bind-vfio",
            "--simulate-gpus 1xH100-80GB:vfio",
        ],
    );

    // A VM with one GPU: placement gives it the vfio-pci one and its passthrough plan is made
    // (over the simulated sysfs tree), then the VM runtime takes it. Without a VM runtime in
    // this build, the create is refused saying so, after placement and the plan: what exists
    // is tested either way; a booting VM is the VM runtime's tests' (vm/runtime.rs).
    let vm = create(&d, &["--runtime", "vm", "--gpus", "1"]);
    let vm_runs = vm.status.success();
    if vm_runs {
        let vm: Value = serde_json::from_slice(&vm.stdout).unwrap();
        assert_eq!(vm["runtime"], "vm", "{vm}");
        assert_eq!(vm["gpus"][0]["uuid"], h100.as_str(), "{vm}");
        assert_eq!(vm["gpus"][0]["milli"], 1000, "{vm}");
    } else {
        let err = stderr(&vm);
        assert!(
            err.contains("the runtime is not set up") && !err.contains("not enough"),
            "a VM placed on the vfio-pci GPU is refused only for the missing VM runtime: {err}"
        );
    }
    refused(
        &create(&d, &["--runtime", "vm", "--gpus", "2"]),
        6,
        &[if vm_runs {
            "bound to vfio-pci for a VM: 2 any wanted, 0 free of 1"
        } else {
            "bound to vfio-pci for a VM: 2 any wanted, 1 free of 1"
        }],
    );
    // Both GPUs taken, each by its kind.
    if vm_runs {
        refused(
            &create(&d, &["--runtime", "vm", "--gpus", "1"]),
            6,
            &["bound to vfio-pci for a VM: 1 any wanted, 0 free of 1"],
        );
    }
    d.terminate_all();
}

#[test]
fn a_vm_is_told_how_to_get_a_gpu_and_never_gets_a_mig_slice() {
    let _s = serial();
    let d = Daemon::start_with_gpus("1xA100-80GB:mig,1xH100-80GB", &NET);
    d.import_busybox();

    // No GPU bound to vfio-pci at all.
    refused(
        &create(&d, &["--runtime", "vm", "--gpus", "1"]),
        6,
        &[
            "not enough GPUs bound to vfio-pci for a VM: 1 any wanted, 0 free of 0",
            "a VM takes whole GPUs by passthrough: ask an admin to bind one to vfio-pci (`gpuvisor gpu bind-vfio GPU`",
            "1 on the host driver is for containers",
        ],
    );
    // Simulated GPUs cannot be bound by hand: the refusal says how to simulate one.
    refused(
        &d.cli(&["gpu", "bind-vfio", "1"]),
        5,
        &["is simulated", "--simulate-gpus 1xH100-80GB:vfio"],
    );

    // A MIG slice: a container's, never a VM's.
    let gi = d.json(&["gpu", "mig", "create", "0", "3g.40gb", "--yes"]);
    assert!(gi["id"].is_number(), "{gi}");
    refused(
        &create(
            &d,
            &[
                "--runtime",
                "vm",
                "--gpus",
                "1",
                "--gpu-model",
                "A100-80GB-3g.40gb",
            ],
        ),
        5,
        &["is a MIG slice: a VM takes whole GPUs by passthrough, not MIG slices"],
    );
    d.terminate_all();
}
