//! Project automation for the qcow workspace, run as `cargo xtask <command>`
//! (an alias defined in `.cargo/config.toml`).
//!
//! Commands:
//!
//! * `fixtures [--check]`: regenerate `testdata/` with qemu-img and qemu-io,
//!   or check that the committed fixtures still match their manifest;
//! * `bench [--size-gib N] [--runs N] [--qcow PATH]`: time `qcow convert`
//!   against `qemu-img convert` on large images, then `qcow check` against
//!   `qemu-img check`;
//! * `bench-serve [--runs N] [--qcow PATH]`: `qcow serve` against
//!   `qemu-nbd` with the same client, then `qcow` against `qemu-img` as
//!   clients of one `qemu-nbd`;
//! * `iotests --qemu-source DIR [--jobs N] [--qcow PATH]`: QEMU's qcow2
//!   iotests with qemu-img and with qcow in its place, and how many pass.

mod bench;
mod bench_check;
mod bench_crypto;
mod bench_engine;
mod bench_nbd_client;
mod bench_serve;
mod bench_tls;
mod fixtures;
mod iotests;
mod util;

use std::process::ExitCode;

/// Usage text printed for `help` and on bad input.
const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  fixtures [--check]               regenerate testdata/ with qemu-img and qemu-io;
                                   --check regenerates into a temporary directory and
                                   fails if the contents differ from testdata/manifest.tsv
  bench [--size-gib N] [--runs N] [--qcow PATH]
                                   time `qcow convert -O raw` against `qemu-img convert
                                   -O raw` on N GiB images (default 1) in bench-work/,
                                   N timed runs each (default 5); builds the release
                                   qcow-cli first unless --qcow names a binary to use;
                                   then the write jobs and `check` beside qemu-img check
  bench-serve [--runs N] [--qcow PATH]
                                   time `qcow serve` against qemu-nbd on a cached 1 GiB
                                   qcow2 with qemu-img bench as the client: sequential
                                   reads, 4 KiB reads and writes at queue depth 32
  iotests --qemu-source DIR [--jobs N] [--qcow PATH]
                                   run QEMU's qcow2 iotests from DIR with qemu-img, then
                                   with qcow in its place; report how many pass with each
  help                             print this message";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let result = match command.as_str() {
        "fixtures" => fixtures::run(rest),
        "bench" => bench::run(rest),
        "bench-serve" => bench_serve::run(rest),
        "iotests" => iotests::run(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("error: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
