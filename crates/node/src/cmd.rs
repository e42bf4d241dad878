//! Running host tools (`mkfs.ext4`, `losetup`, `ip`, `iptables`, the OCI runtime) with errors
//! that say which command failed and what it printed. One place, so every caller reports the same
//! way and nothing inherits the daemon's stdin.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CmdError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Runs `program args...`, returning stdout; a non-zero exit is an error carrying stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CmdError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CmdError::Failed {
            command: describe(program, &args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Like [`run`], with `input` written to the command's stdin (then closed), e.g. `ip -batch -`.
/// A failure names the command followed by its input, lines joined with "; ".
pub fn run_with_input<I, S>(program: &str, args: I, input: &str) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let spawn_error = |source| CmdError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let stdin = child.stdin.take();
    // Written from a second thread while this one collects the output, so neither side can
    // block on a full pipe whatever the sizes.
    let (out, written) = std::thread::scope(|s| {
        let writer = stdin.map(|mut stdin| s.spawn(move || stdin.write_all(input.as_bytes())));
        let out = child.wait_with_output();
        let written = match writer.map(|w| w.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(std::io::Error::other("stdin writer panicked")),
        };
        (out, written)
    });
    let out = out.map_err(spawn_error)?;
    if !out.status.success() {
        let lines: Vec<&str> = input.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(CmdError::Failed {
            command: format!("{} <<< [{}]", describe(program, &args), lines.join("; ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // It succeeded without reading all of its input: part of it never ran.
    written.map_err(spawn_error)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(program: &str, args: &[std::ffi::OsString]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_with_input_feeds_stdin_and_reports_failures() {
        let big = "x".repeat(1 << 20);
        assert_eq!(run_with_input("cat", [] as [&str; 0], &big).unwrap(), big);
        assert_eq!(
            run_with_input("sh", ["-c", "read a; read b; echo $b$a"], "1\n2\n").unwrap(),
            "21\n"
        );
        match run_with_input(
            "sh",
            ["-c", "cat >/dev/null; echo oops >&2; exit 3"],
            "a\nb\n",
        ) {
            Err(CmdError::Failed {
                command, stderr, ..
            }) => {
                assert_eq!(
                    command,
                    "sh -c cat >/dev/null; echo oops >&2; exit 3 <<< [a; b]"
                );
                assert_eq!(stderr, "oops");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            run_with_input("/nonexistent/tool", ["x"], ""),
            Err(CmdError::Spawn { .. })
        ));
    }
}
