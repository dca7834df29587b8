//! One module per subcommand.

mod convert;
mod export;
mod read;

use crate::args::Command;
use hoist_oci::ImageRef;

/// Runs a subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Convert {
            src,
            dst,
            compressor,
            chunk_size,
            chunk_dict,
            json,
        } => convert::run(
            &src,
            &dst,
            compressor,
            chunk_size,
            chunk_dict.as_deref(),
            json,
        ),
        Command::Unpack { image, dir } => read::unpack(&image, &dir),
        Command::Check { image } => read::check(&image),
        Command::Inspect { image, json } => read::inspect(&image, json),
        Command::Export { image, dir } => export::run(&image, &dir),
    }
}

fn open_source(reference: &str) -> anyhow::Result<Box<dyn hoist_oci::ImageSource>> {
    Ok(hoist_oci::open_source(&ImageRef::parse(reference)?)?)
}

fn open_hoist(reference: &str) -> anyhow::Result<hoist_reader::HoistImage> {
    Ok(hoist_reader::HoistImage::open(open_source(reference)?)?)
}

/// `12.3 MB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
