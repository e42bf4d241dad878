//! Templates: a named instance recipe (image, runtime, GPUs, sizes, volumes, env, ports,
//! command, startup script) that `instance create --template NAME` starts from; the request's
//! own fields override it. Public templates are an admin's and every tenant's to use; private
//! ones belong to one tenant.

use crate::{PortSpec, RuntimeKind, VolumeMount};
use serde::{Deserialize, Serialize};

/// What a template sets. Everything but the image is optional: what it leaves out, the
/// request (or the defaults) decide.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_disk: Option<u64>,
    /// Volumes by name, created at their size on first use (one per tenant and name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// `KEY=VALUE`; a request's `env` with the same key wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// The command (default: the image's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A shell script run at start: by cloud-init in a VM (once, at first boot); in a
    /// container by `/bin/sh` before the command, at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<String>,
}

/// `POST /v1/templates`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateTemplate {
    pub name: String,
    /// Every tenant may use it (admins only).
    #[serde(default)]
    pub public: bool,
    #[serde(flatten)]
    pub spec: TemplateSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Template {
    pub name: String,
    pub public: bool,
    /// The owning tenant of a private template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    #[serde(flatten)]
    pub spec: TemplateSpec,
}
