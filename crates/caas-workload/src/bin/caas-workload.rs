//! Stand-alone process workload (`caas-workload workload run --spec FILE`), the same CLI as
//! `caas workload`; used by this crate's end-to-end tests of the process driver.
fn main() -> std::process::ExitCode {
    caas_workload::cli::standalone_main("caas-workload", "caas process workload")
}
