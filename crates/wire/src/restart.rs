//! Restart policies (`--restart no|on-failure[:N]|always`, Docker's vocabulary) and the state of a
//! volume. Both travel as plain strings (`"on-failure:3"`, `"ready"`), so the JSON a user reads is
//! the flag they typed.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// What happens when an instance's main process exits while its desired state is running.
/// `instance stop` always wins: a stopped instance is never restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Never: the instance ends `stopped` with the exit code as its reason.
    No,
    /// Only after a non-zero (or unknown) exit, at most `max` times (`None`: no limit) since the
    /// last `instance create`/`start`.
    OnFailure { max: Option<u32> },
    /// After every exit (the default for instances that should run).
    #[default]
    Always,
}

impl RestartPolicy {
    /// Parses `no`, `on-failure`, `on-failure:N` (N ≥ 1) or `always`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(Self::No),
            "always" => Ok(Self::Always),
            "on-failure" => Ok(Self::OnFailure { max: None }),
            _ => match s.strip_prefix("on-failure:") {
                Some(n) => match n.parse::<u32>() {
                    Ok(0) | Err(_) => Err(format!(
                        "restart policy {s:?}: the retry limit after `on-failure:` must be a whole number from 1"
                    )),
                    Ok(n) => Ok(Self::OnFailure { max: Some(n) }),
                },
                None => Err(format!(
                    "restart policy {s:?} is not one of: no, on-failure[:N], always"
                )),
            },
        }
    }

    /// Whether an instance that has been restarted `count` times since its last start is
    /// restarted again after an exit with `code` (`None`: the status is unknown, e.g. the host
    /// rebooted, which counts as a failure).
    pub fn restarts(self, code: Option<i32>, count: u32) -> bool {
        match self {
            Self::No => false,
            Self::Always => true,
            Self::OnFailure { max } => code != Some(0) && max.is_none_or(|m| count < m),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::No => f.write_str("no"),
            Self::Always => f.write_str("always"),
            Self::OnFailure { max: None } => f.write_str("on-failure"),
            Self::OnFailure { max: Some(n) } => write!(f, "on-failure:{n}"),
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for RestartPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for RestartPolicy {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RestartPolicy".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "`no`, `always`, `on-failure` or `on-failure:N` (N restarts at most)",
            "pattern": "^(no|always|on-failure(:[0-9]+)?)$"
        })
    }
}

impl<'de> Deserialize<'de> for RestartPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A volume's row is written `pending` before its image file is made and becomes `ready` once
/// the file is complete (and, for a volume made by `instance create`, once the instance's row
/// is written). The daemon finishes or removes a pending volume after a crash; an instance never
/// mounts one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Pending,
    #[default]
    Ready,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Ready]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        for s in ["no", "always", "on-failure", "on-failure:3"] {
            assert_eq!(RestartPolicy::parse(s).unwrap().to_string(), s);
        }
        for bad in [
            "",
            "yes",
            "on-failure:0",
            "on-failure:-1",
            "on-failure:x",
            "Always",
        ] {
            assert!(RestartPolicy::parse(bad).is_err(), "{bad}");
        }
        let j = serde_json::to_string(&RestartPolicy::OnFailure { max: Some(2) }).unwrap();
        assert_eq!(j, "\"on-failure:2\"");
        assert_eq!(
            serde_json::from_str::<RestartPolicy>(&j).unwrap(),
            RestartPolicy::OnFailure { max: Some(2) }
        );
    }

    #[test]
    fn who_restarts() {
        let of2 = RestartPolicy::OnFailure { max: Some(2) };
        assert!(of2.restarts(Some(3), 0));
        assert!(of2.restarts(Some(3), 1));
        assert!(!of2.restarts(Some(3), 2));
        assert!(!of2.restarts(Some(0), 0));
        assert!(of2.restarts(None, 0), "an unknown exit is a failure");
        assert!(RestartPolicy::Always.restarts(Some(0), 1000));
        assert!(!RestartPolicy::No.restarts(Some(1), 0));
        assert!(RestartPolicy::OnFailure { max: None }.restarts(Some(1), 1000));
    }
}
