//! Templates: named instance recipes. `instance create --template NAME` starts from one; what
//! the request sets overrides it; what neither sets gets the defaults. Public templates are an
//! admin's (owner ''); private ones a tenant's. A tenant sees its own and the public ones; a
//! name resolves to its own first.

use super::authz::Op;
use super::{now_ms, validate, Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use crate::store::{StoreError, TemplateRow};
use gpuvisor_wire::{self as wire, CreateInstance, TemplateSpec};

/// What an instance gets when neither the request nor its template says.
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY: u64 = 1 << 30;
pub const DEFAULT_CONTAINER_DISK: u64 = 10 << 30;
const MAX_DESCRIPTION: usize = 1024;
/// Templates one tenant may keep.
pub const MAX_TEMPLATES_PER_TENANT: usize = 256;

/// `req` over `t` (when given) over the defaults: scalars the request leaves unset (empty
/// image, zero sizes, no GPU request, no runtime) come from the template; lists are merged,
/// the request's entry winning on the same key (env name, port, volume name or path).
pub fn merge(t: Option<&TemplateSpec>, req: &CreateInstance) -> CreateInstance {
    let empty = TemplateSpec::default();
    let t = t.unwrap_or(&empty);
    let mut out = req.clone();
    if out.image.is_empty() {
        out.image = t.image.clone();
    }
    out.runtime = Some(req.runtime.or(t.runtime).unwrap_or_default());
    if req.gpus.is_none() && req.gpu_fraction.is_none() {
        out.gpus = t.gpus;
        out.gpu_fraction = t.gpu_fraction;
    }
    out.gpu_model = req.gpu_model.clone().or_else(|| t.gpu_model.clone());
    let pick = |asked: u64, templ: Option<u64>, default: u64| match asked {
        0 => templ.unwrap_or(default),
        n => n,
    };
    out.vcpus = pick(
        req.vcpus.into(),
        t.vcpus.map(u64::from),
        DEFAULT_VCPUS.into(),
    ) as u32;
    out.memory = pick(req.memory, t.memory, DEFAULT_MEMORY);
    out.container_disk = pick(req.container_disk, t.container_disk, DEFAULT_CONTAINER_DISK);
    out.volumes = t
        .volumes
        .iter()
        .filter(|tv| {
            !req.volumes
                .iter()
                .any(|v| v.name == tv.name || v.path == tv.path)
        })
        .chain(&req.volumes)
        .cloned()
        .collect();
    let key = |kv: &String| {
        kv.split_once('=')
            .map_or(kv.clone(), |(k, _)| k.to_string())
    };
    out.env = t
        .env
        .iter()
        .filter(|kv| !req.env.iter().any(|r| key(r) == key(kv)))
        .chain(&req.env)
        .cloned()
        .collect();
    out.ports = t
        .ports
        .iter()
        .filter(|p| !req.ports.iter().any(|r| r.port == p.port))
        .chain(&req.ports)
        .cloned()
        .collect();
    if out.command.is_empty() {
        out.command = t.command.clone();
    }
    if out.startup_script.is_none() {
        out.startup_script = t.startup_script.clone();
    }
    out
}

/// A container's command with its startup script first: `/bin/sh -c 'set -e; SCRIPT; exec
/// "$@"' startup CMD...`, so the script runs at every start and the command becomes the
/// main process (its exit status is the instance's). While the script runs the shell is PID 1,
/// which ignores signals it has no handler for: the trap lets `instance stop` end it.
pub fn with_startup_script(script: &str, command: &[String]) -> Vec<String> {
    let mut out = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        format!("trap 'exit 143' TERM INT\nset -e\n{script}\nexec \"$@\""),
        "startup".to_string(),
    ];
    out.extend(command.iter().cloned());
    out
}

fn wire_template(t: TemplateRow, owner_name: Option<String>) -> wire::Template {
    wire::Template {
        name: t.name,
        public: t.owner.is_empty(),
        tenant: owner_name,
        created_at: t.created_at,
        spec: t.spec,
    }
}

impl Engine {
    /// The template `name` as `who` resolves it: its tenant's own, else the public one.
    async fn find_template(&self, who: &Principal, name: &str) -> Result<TemplateRow> {
        if let Some(t) = self.store.template(&who.tenant_id, name).await? {
            return Ok(t);
        }
        self.store.template("", name).await?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "template {name:?} not found (see `gpuvisor template list`)"
            ))
        })
    }

    /// The request with its template (if it names one) and the defaults applied.
    pub(crate) async fn resolve_request(
        &self,
        who: &Principal,
        req: &CreateInstance,
    ) -> Result<CreateInstance> {
        let t = match &req.template {
            Some(name) => Some(self.find_template(who, name).await?),
            None => None,
        };
        Ok(merge(t.as_ref().map(|t| &t.spec), req))
    }

    pub async fn create_template(
        &self,
        who: &Principal,
        req: &wire::CreateTemplate,
    ) -> Result<wire::Template> {
        who.allow(Op::CreateTemplate)?;
        validate::name("template", &req.name)?;
        if req.public && !who.is_admin() {
            return Err(EngineError::Forbidden(
                "public templates are an admin's: leave out --public to make one for your tenant"
                    .into(),
            ));
        }
        if req
            .spec
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DESCRIPTION)
        {
            return Err(invalid(format!(
                "the description is longer than {MAX_DESCRIPTION} bytes"
            )));
        }
        // Its rules are an instance's: checked as the request it makes on its own, against
        // any host (the host's own size is checked when an instance is made from it).
        let probe = merge(Some(&req.spec), &CreateInstance::default());
        validate::create(&probe, &validate::HostLimits::ANY)?;
        let owner = if req.public {
            ""
        } else {
            who.tenant_id.as_str()
        };
        // The image must be one its users can see: a public one for a public template.
        let image = if req.public {
            self.store.image_of("", &req.spec.image).await?
        } else {
            self.store.image_visible(owner, &req.spec.image).await?
        };
        if image.is_none() {
            return Err(EngineError::NotFound(format!(
                "image {:?} not found{} (see `gpuvisor image list`)",
                req.spec.image,
                if req.public {
                    " among the public images"
                } else {
                    ""
                }
            )));
        }
        if !req.public
            && self
                .store
                .templates(Some(owner))
                .await?
                .iter()
                .filter(|t| t.owner == owner)
                .count()
                >= MAX_TEMPLATES_PER_TENANT
        {
            return Err(EngineError::QuotaExceeded(format!(
                "a tenant keeps at most {MAX_TEMPLATES_PER_TENANT} templates: remove one first"
            )));
        }
        let row = TemplateRow {
            owner: owner.to_string(),
            name: req.name.clone(),
            spec: req.spec.clone(),
            created_at: now_ms(),
        };
        self.store
            .insert_template(&row)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => EngineError::AlreadyExists(format!(
                    "template {:?} exists (remove it first)",
                    req.name
                )),
                e => e.into(),
            })?;
        Ok(wire_template(
            row,
            (!req.public).then(|| who.tenant.clone()),
        ))
    }

    /// The public templates and the caller's tenant's (an admin: every tenant's).
    pub async fn list_templates(&self, who: &Principal) -> Result<Vec<wire::Template>> {
        who.allow(Op::ListTemplates)?;
        let names = self.tenant_names().await?;
        let scope = (!who.is_admin()).then_some(who.tenant_id.as_str());
        Ok(self
            .store
            .templates(scope)
            .await?
            .into_iter()
            .map(|t| {
                let owner = (!t.owner.is_empty())
                    .then(|| names.get(&t.owner).cloned().unwrap_or(t.owner.clone()));
                wire_template(t, owner)
            })
            .collect())
    }

    pub async fn get_template(&self, who: &Principal, name: &str) -> Result<wire::Template> {
        who.allow(Op::GetTemplate)?;
        let t = self.find_template(who, name).await?;
        let owner = (!t.owner.is_empty()).then(|| who.tenant.clone());
        Ok(wire_template(t, owner))
    }

    /// Removes the caller's tenant's template `name`, else (an admin) the public one.
    /// Instances made from it keep what they were made with.
    pub async fn remove_template(&self, who: &Principal, name: &str) -> Result<wire::Template> {
        who.allow(Op::RemoveTemplate)?;
        let t = self.find_template(who, name).await?;
        if t.owner.is_empty() && !who.is_admin() {
            return Err(EngineError::Forbidden(format!(
                "template {name:?} is public: only an admin removes it"
            )));
        }
        self.store.delete_template(&t.owner, &t.name).await?;
        let owner = (!t.owner.is_empty()).then(|| who.tenant.clone());
        Ok(wire_template(t, owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvisor_wire::{PortSpec, RuntimeKind, VolumeMount};

    fn spec() -> TemplateSpec {
        TemplateSpec {
            image: "pytorch".into(),
            runtime: Some(RuntimeKind::Container),
            gpus: Some(1),
            vcpus: Some(4),
            memory: Some(8 << 30),
            container_disk: Some(20 << 30),
            volumes: vec![VolumeMount {
                name: "work".into(),
                path: "/workspace".into(),
                size: Some(1 << 30),
            }],
            env: vec!["A=1".into(), "B=2".into()],
            ports: vec![PortSpec {
                port: 8888,
                protocol: "http".into(),
                public: false,
                host_port: None,
            }],
            command: vec!["serve".into()],
            startup_script: Some("echo hi".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_bare_request_takes_the_template_and_the_defaults_fill_the_rest() {
        let m = merge(Some(&spec()), &CreateInstance::default());
        assert_eq!(m.image, "pytorch");
        assert_eq!((m.gpus, m.vcpus, m.memory), (Some(1), 4, 8 << 30));
        assert_eq!(m.container_disk, 20 << 30);
        assert_eq!(m.volumes[0].path, "/workspace");
        assert_eq!(m.command, ["serve"]);
        assert_eq!(m.startup_script.as_deref(), Some("echo hi"));
        let none = merge(None, &CreateInstance::default());
        assert_eq!(
            (none.vcpus, none.memory, none.container_disk),
            (DEFAULT_VCPUS, DEFAULT_MEMORY, DEFAULT_CONTAINER_DISK)
        );
        assert_eq!(none.runtime, Some(RuntimeKind::Container));
    }

    #[test]
    fn the_request_overrides_scalars_and_wins_list_entries_by_key() {
        let req = CreateInstance {
            gpu_fraction: Some(0.5),
            vcpus: 2,
            env: vec!["B=3".into(), "C=4".into()],
            ports: vec![PortSpec {
                port: 8888,
                protocol: "tcp".into(),
                public: false,
                host_port: None,
            }],
            volumes: vec![VolumeMount {
                name: "other".into(),
                path: "/workspace".into(),
                size: None,
            }],
            runtime: Some(RuntimeKind::Vm),
            ..Default::default()
        };
        let m = merge(Some(&spec()), &req);
        // A fraction asked for replaces the template's whole GPU.
        assert_eq!((m.gpus, m.gpu_fraction), (None, Some(0.5)));
        assert_eq!((m.vcpus, m.memory), (2, 8 << 30));
        assert_eq!(m.env, ["A=1", "B=3", "C=4"]);
        assert_eq!(m.ports.len(), 1);
        assert_eq!(m.ports[0].protocol, "tcp");
        assert_eq!(m.volumes.len(), 1);
        assert_eq!(m.volumes[0].name, "other");
        assert_eq!(m.runtime, Some(RuntimeKind::Vm));
    }

    #[test]
    fn a_startup_script_runs_before_the_command_and_hands_it_pid_1() {
        let c = with_startup_script("touch /x", &["sleep".into(), "1".into()]);
        assert_eq!(c[0], "/bin/sh");
        assert_eq!(
            c[2],
            "trap 'exit 143' TERM INT\nset -e\ntouch /x\nexec \"$@\""
        );
        assert_eq!(&c[3..], ["startup", "sleep", "1"]);
    }
}
