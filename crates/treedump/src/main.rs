//! `treedump DIR` prints the dump; `treedump DIR_A DIR_B` prints the differences and
//! exits 1 if there are any.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dumps: Result<Vec<_>, _> = args
        .iter()
        .map(|a| hoist_treedump::dump(Path::new(a)))
        .collect();
    match (args.len(), dumps) {
        (1, Ok(d)) => {
            d[0].iter().for_each(|l| println!("{l}"));
            ExitCode::SUCCESS
        }
        (2, Ok(d)) => {
            let (a, b) = hoist_treedump::diff(&d[0], &d[1]);
            a.iter().for_each(|l| println!("- {l}"));
            b.iter().for_each(|l| println!("+ {l}"));
            if a.is_empty() && b.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        (_, Err(e)) => {
            eprintln!("treedump: {e}");
            ExitCode::from(2)
        }
        _ => {
            eprintln!("usage: treedump DIR | treedump DIR_A DIR_B");
            ExitCode::from(2)
        }
    }
}
