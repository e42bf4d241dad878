//! The OpenAPI 3.1 description of the REST API, generated from the router itself: every route
//! of [`crate::api`]'s table is described from its handler's type (its `Query`, `Body` and
//! answer types, whose JSON Schemas come from the wire types through `schemars`), so a route
//! cannot exist undescribed and a description cannot drift from the code. Served at
//! `/openapi.json`; `gpuvisor openapi` prints it; docs/api/openapi.json is the committed copy a
//! test compares with.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};
use std::future::Future;

/// What one operation's handler says about itself.
#[derive(Default)]
pub struct OpDoc {
    pub query: Option<Value>,
    pub body: Option<(String, Value)>,
    /// The body may be left out.
    pub body_optional: bool,
    /// The success status and the answer's schema (`None`: not JSON, e.g. a stream).
    pub ok: Option<(u16, Option<Value>)>,
    /// A WebSocket upgrade (101).
    pub websocket: bool,
    /// An upgrade to raw bytes (101): a migration channel.
    pub raw_upgrade: bool,
}

/// A handler argument's part in the description (most say nothing).
pub trait ArgDoc {
    fn doc(_op: &mut OpDoc, _g: &mut SchemaGenerator) {}
}

/// A handler's answer's part.
pub trait OutDoc {
    fn doc(op: &mut OpDoc, g: &mut SchemaGenerator);
}

/// A handler that can describe itself: every argument and its answer can.
pub trait Describe<M> {
    fn describe(&self, g: &mut SchemaGenerator) -> OpDoc;
}

macro_rules! describe_fn {
    ($($t:ident),*) => {
        impl<F, Fut, O, $($t),*> Describe<($($t,)*)> for F
        where
            F: Fn($($t),*) -> Fut,
            Fut: Future<Output = O>,
            O: OutDoc,
            $($t: ArgDoc,)*
        {
            fn describe(&self, g: &mut SchemaGenerator) -> OpDoc {
                let mut op = OpDoc::default();
                $(<$t as ArgDoc>::doc(&mut op, g);)*
                O::doc(&mut op, g);
                op
            }
        }
    };
}

describe_fn!();
describe_fn!(T1);
describe_fn!(T1, T2);
describe_fn!(T1, T2, T3);
describe_fn!(T1, T2, T3, T4);
describe_fn!(T1, T2, T3, T4, T5);
describe_fn!(T1, T2, T3, T4, T5, T6);
describe_fn!(T1, T2, T3, T4, T5, T6, T7);

/// The schema of `T` in the generator (a `$ref` to a component for named types).
pub fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

/// The query parameters of `T`: one per property of its (inlined) object schema.
pub fn query_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    let root = T::json_schema(g).to_value();
    let required: Vec<&str> = root["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let params: Vec<Value> = root["properties"]
        .as_object()
        .map(|props| {
            props
                .iter()
                .map(|(name, schema)| {
                    json!({
                        "name": name,
                        "in": "query",
                        "required": required.contains(&name.as_str()),
                        "schema": schema,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Value::Array(params)
}

/// `/v1/instances/{id}` → its path parameters.
fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "schema": {"type": "string", "minLength": 1},
            })
        })
        .collect()
}

/// One route of the table, described.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    /// The operation's stable name (`instance.create`); `None` for a route of none (the
    /// health probe, this document, GraphQL's, whose fields name theirs).
    pub op: Option<&'static str>,
    /// Answered without a key.
    pub public: bool,
    pub doc: OpDoc,
}

fn error_response() -> Value {
    json!({
        "description": "An error: a stable code and a message saying what is wrong.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    })
}

fn operation(r: &RouteDoc) -> Value {
    let tag = r
        .path
        .trim_start_matches('/')
        .trim_start_matches("v1/")
        .split(['/', '.'])
        .next()
        .unwrap_or("api")
        .to_string();
    // The operation's stable name, else (routes of no engine operation) its method and path.
    let id = match r.op {
        Some(op) => op.replace('.', "_"),
        None => format!(
            "{}{}",
            r.method.to_lowercase(),
            r.path.replace(['/', '.', '{', '}', '-'], "_")
        ),
    };
    let mut params = path_params(r.path);
    if let Some(Value::Array(q)) = &r.doc.query {
        params.extend(q.iter().cloned());
    }
    let mut responses = Map::new();
    if r.doc.raw_upgrade {
        responses.insert(
            "101".into(),
            json!({"description": "Switching to raw bytes both ways (Upgrade: gpuvisor-migration): a live migration's disk (NBD) or state channel."}),
        );
    }
    if r.doc.websocket {
        responses.insert(
            "101".into(),
            json!({"description": "Switching to a WebSocket: an exec or console session (its frames: gpuvisor_wire::ExecSessionRequest and session::Control), a VM's graphical console (raw RFB in binary messages), an instance's metrics stream (a text message of gpuvisor_wire::MetricsUpdate JSON per sample) or GraphQL subscriptions (graphql-transport-ws)."}),
        );
    }
    match &r.doc.ok {
        Some((status, Some(schema))) => {
            responses.insert(
                status.to_string(),
                json!({"description": "Success.", "content": {"application/json": {"schema": schema}}}),
            );
        }
        Some((status, None)) if !r.doc.websocket && !r.doc.raw_upgrade => {
            responses.insert(
                status.to_string(),
                json!({"description": "Success (a stream or text, not JSON)."}),
            );
        }
        _ => {}
    }
    responses.insert("default".into(), error_response());
    let mut op = json!({
        "operationId": id,
        "tags": [tag],
        "summary": r.op.unwrap_or(&id),
        "parameters": params,
        "responses": responses,
    });
    if let Some((media, schema)) = &r.doc.body {
        op["requestBody"] = json!({
            "required": !r.doc.body_optional,
            "content": {media.as_str(): {"schema": schema}},
        });
    }
    if r.public {
        op["security"] = json!([]);
    }
    op
}

/// A generator whose named schemas land in `#/components/schemas`.
pub fn generator() -> SchemaGenerator {
    SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas/".into())
        .into_generator()
}

/// The whole document.
pub fn document(routes: &[RouteDoc], g: &mut SchemaGenerator) -> Value {
    // Errors have one shape everywhere.
    schema_of::<gpuvisor_wire::ErrorBody>(g);
    let mut paths = Map::new();
    let mut ids = std::collections::HashSet::new();
    for r in routes {
        let mut op = operation(r);
        // Routes sharing an engine operation (RunPod's `status` by GET and POST, `run` and
        // `runsync`): the first keeps the operation's name, the others add what tells them
        // apart, the method and the path's last fixed segment.
        let base = op["operationId"].as_str().unwrap_or("").to_string();
        if !ids.insert(base.clone()) {
            let segment = r
                .path
                .split('/')
                .rev()
                .find(|s| !s.is_empty() && !s.starts_with('{'))
                .unwrap_or("")
                .replace('-', "_");
            let id = format!("{base}_{}_{segment}", r.method.to_lowercase());
            ids.insert(id.clone());
            op["operationId"] = Value::String(id);
        }
        let item = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        item[r.method.to_lowercase()] = op;
    }
    let mut schemas = g.take_definitions(true);
    schemas.sort_keys();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "gpuvisor",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "GPU instances (containers and micro-VMs), volumes, images, tenants and keys. Every route but /v1/health takes an API key (`x-api-key`, or `Authorization: Bearer`; bare `Authorization` too, as RunPod's clients send it). Serverless endpoints' queues are RunPod's API under /v2/<endpoint-id>/. Errors are `{\"error\":{\"code\",\"message\"}}` with stable codes.",
        },
        "servers": [{"url": "https://127.0.0.1:7070"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": gpuvisor_wire::API_KEY_HEADER},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/api/openapi.json is the code's document (CI fails when a route or a wire type
    /// changed without it).
    #[test]
    fn the_committed_document_is_the_codes() {
        let committed: Value = serde_json::from_str(include_str!("../../../docs/api/openapi.json"))
            .unwrap_or(Value::Null);
        assert!(
            committed == *crate::api::openapi_document(),
            "docs/api/openapi.json is stale: run `cargo run -p gpuvisor -- openapi > docs/api/openapi.json`"
        );
    }

    /// Every route is in the document, with its method, and every operation has an error
    /// answer in the API's shape.
    #[test]
    fn every_route_is_described() {
        let doc = crate::api::openapi_document();
        for (method, path, _) in crate::api::route_table() {
            let op = &doc["paths"][path][method.to_lowercase()];
            assert!(op.is_object(), "{method} {path} is not described");
            assert_eq!(
                op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
        }
        let create = &doc["paths"]["/v1/instances"]["post"];
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/CreateInstance"
        );
        assert!(create["responses"]["201"].is_object(), "{create}");
        assert!(doc["components"]["schemas"]["Instance"]["properties"]["gpus"].is_object());
    }

    #[test]
    fn operation_ids_are_unique_and_only_the_probe_the_document_and_the_login_are_public() {
        let doc = crate::api::openapi_document();
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let id = op["operationId"].as_str().unwrap_or("");
                assert!(
                    ids.insert(id.to_string()),
                    "{method} {path}: operationId {id} again"
                );
                let public = op["security"] == json!([]);
                assert_eq!(
                    public,
                    path == "/v1/health"
                        || path == crate::api::OPENAPI_PATH
                        || (method == "post" && path == crate::api::SESSIONS_PATH),
                    "{method} {path}"
                );
                assert!(
                    !op["tags"][0].as_str().unwrap_or("").is_empty(),
                    "{method} {path}"
                );
            }
        }
    }

    #[test]
    fn path_parameters_come_from_the_template() {
        let p = path_params("/v1/gpus/{id}/mig/{gi}");
        let names: Vec<&str> = p.iter().map(|v| v["name"].as_str().unwrap_or("")).collect();
        assert_eq!(names, ["id", "gi"]);
    }

    #[test]
    fn query_parameters_come_from_the_query_type() {
        let mut g = generator();
        let q = query_of::<gpuvisor_wire::UsageQuery>(&mut g);
        let names: Vec<&str> = q
            .as_array()
            .map(|a| a.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["from", "subject", "tenant", "to"]);
    }
}
