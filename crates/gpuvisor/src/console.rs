//! The web console's files, embedded at build time (`build.rs` from `web/dist`), served at `/`
//! on the API's own listener: `index.html` at `/` (the pages route with `#/...`), hashed files
//! under `/assets/`. Every answer carries a strict Content-Security-Policy (scripts, styles,
//! connections and frames from this origin only; no inline script, no eval, no framing) and
//! the usual hardening headers; the console makes no request to any other site. Logging in is
//! the API's (`POST /v1/sessions`).

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

struct Asset {
    path: &'static str,
    mime: &'static str,
    raw: &'static [u8],
    gz: &'static [u8],
}

static ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// What every console answer says about itself.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; worker-src 'self'; \
    object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// Whether this binary carries a console build.
pub fn built() -> bool {
    ASSETS.iter().any(|a| a.path == "/index.html")
}

fn hardened(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("permissions-policy"),
            "camera=(), microphone=(), geolocation=(), payment=()",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

fn serve(path: &str, h: &HeaderMap) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.path == path) else {
        return hardened(
            (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "not found\n",
            )
                .into_response(),
        );
    };
    let gzip = h
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.trim().split(';');
            parts.next() == Some("gzip") && !parts.any(|q| q.trim() == "q=0")
        });
    // Hashed names never change content: cached for good. The page itself is checked each time.
    let cache = if path.starts_with("/assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut r = if gzip {
        (
            [
                (header::CONTENT_TYPE, a.mime),
                (header::CONTENT_ENCODING, "gzip"),
                (header::CACHE_CONTROL, cache),
                (header::VARY, "accept-encoding"),
            ],
            a.gz,
        )
            .into_response()
    } else {
        (
            [
                (header::CONTENT_TYPE, a.mime),
                (header::CACHE_CONTROL, cache),
                (header::VARY, "accept-encoding"),
            ],
            a.raw,
        )
            .into_response()
    };
    r.headers_mut().remove(header::TRANSFER_ENCODING);
    hardened(r)
}

/// `GET /`: the console's page.
pub async fn index(h: HeaderMap) -> Response {
    if !built() {
        return hardened(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "this gpuvisor binary was built without its web console: run `npm ci && npm run \
                 build` in web/, then build gpuvisor again\n",
            )
                .into_response(),
        );
    }
    serve("/index.html", &h)
}

/// `GET /assets/{file}`.
pub async fn asset(Path(file): Path<String>, h: HeaderMap) -> Response {
    serve(&format!("/assets/{file}"), &h)
}

/// Whether `method path` asks for one of the console's files (the page or an asset):
/// answered without a key, a cookie or a place in flight. The build has no other top-level
/// file (`build.rs` refuses one), so no API path can be taken for a file.
pub fn is_file(method: &axum::http::Method, path: &str) -> bool {
    (method == axum::http::Method::GET || method == axum::http::Method::HEAD)
        && (path == "/" || path.starts_with("/assets/"))
}
