//! `caas`: one binary, a subcommand per role.
fn main() {}
