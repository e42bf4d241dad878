//! The `gpuvisor` binary: `gpuvisor serve` runs the daemon; every other subcommand is a client of
//! its REST API.

mod api;
mod cli;
mod client;
mod config;
mod console;
mod exectty;
mod graphql;
mod ingress;
mod openapi;
mod output;
mod peer;
mod ratelimit;
mod serve;
mod serverless;
mod tls;

fn main() {
    std::process::exit(cli::main());
}
