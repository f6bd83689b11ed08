//! The guest agent a tenant installs in its VM image (`caas-guest workload guest`, see
//! `scripts/build-guest-image`), and the stand-alone process workload (`caas-guest workload
//! run --spec FILE`): the same CLI as `caas workload`, without the other roles, so the guest
//! image carries a small binary. (A binary of the `caas` package, so that building `caas`
//! builds it.)
fn main() -> std::process::ExitCode {
    caas_workload::cli::standalone_main("caas-guest", "caas guest agent and process workload")
}
