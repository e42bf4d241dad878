//! The attack suite: each test performs one attack a hostile tenant, a hostile image or a
//! hostile network neighbour could try, from inside a real instance or through the API with a
//! tenant's key, and fails if the attack works *or* if the probe could not run (see
//! [`probe`]). One module per layer; one test per attack, named after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod probe;

mod api_limits;
mod hostfs;
mod image;
mod limiter;
mod net;
mod seccomp;
mod tenancy;
