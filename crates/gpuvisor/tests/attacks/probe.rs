//! Probes that prove they ran. An attack test asserts that something is refused; a refusal
//! that is really a probe that never started (exec failed, the binary is missing, the shell
//! died) must fail the test instead of passing it. Every probe script here ends by printing a
//! sentinel, and the helpers fail unless the sentinel came back.
#![allow(dead_code)]

use crate::common::Daemon;

const SENTINEL: &str = "__gv_probe_ran__";

/// The result of a probe script that is known to have run to its end.
pub struct Probe {
    /// Exit status of the script's last probed command (`$?` before the sentinel).
    pub rc: i32,
    /// Standard output without the sentinel line.
    pub out: String,
    pub err: String,
}

/// Runs `script` in the instance with `sh -c`, then prints the sentinel with the script's exit
/// status. Panics (failing the test) if exec itself failed or the sentinel is missing.
pub fn run(d: &Daemon, id: &str, script: &str) -> Probe {
    let wrapped = format!("{{ {script}\n}}; echo \"{SENTINEL} $?\"");
    let (rc, out, err) = d.exec(id, &wrapped);
    assert_eq!(
        rc, 0,
        "probe could not run in {id} (exec exit {rc}): {err}\nstdout: {out}"
    );
    let (body, tail) = out
        .rsplit_once(SENTINEL)
        .unwrap_or_else(|| panic!("probe did not reach its end in {id}: {out}\nstderr: {err}"));
    let rc = tail
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad sentinel line {tail:?}"));
    Probe {
        rc,
        out: body.to_string(),
        err,
    }
}

/// Runs `script` and asserts it *failed* (non-zero status): the attack was refused. The probe
/// must have run (see [`run`]).
pub fn refused(d: &Daemon, id: &str, what: &str, script: &str) -> Probe {
    let p = run(d, id, script);
    assert_ne!(
        p.rc, 0,
        "attack succeeded: {what}\nstdout: {}\nstderr: {}",
        p.out, p.err
    );
    p
}

/// Runs `script` and asserts it succeeded (a control: the same probe works where it should).
pub fn allowed(d: &Daemon, id: &str, what: &str, script: &str) -> Probe {
    let p = run(d, id, script);
    assert_eq!(
        p.rc, 0,
        "control failed: {what}\nstdout: {}\nstderr: {}",
        p.out, p.err
    );
    p
}
