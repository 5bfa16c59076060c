//! `nkvm caps`: the capability probe as a table or JSON.

use std::process::ExitCode;

use nkvm::Hypervisor;

use crate::cli::CapsArgs;

/// Prints the probe.
pub fn print(args: &CapsArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let hv = Hypervisor::open()?;
    let rows = hv.capabilities().rows();
    if args.json {
        let body: Vec<String> = rows
            .iter()
            .map(|(k, v)| {
                let is_literal = v == "true" || v == "false" || v.parse::<i64>().is_ok();
                if is_literal {
                    format!("  \"{k}\": {v}")
                } else {
                    format!("  \"{k}\": \"{v}\"")
                }
            })
            .collect();
        println!("{{\n{}\n}}", body.join(",\n"));
    } else {
        println!("{:<26} value", "capability");
        for (k, v) in rows {
            println!("{k:<26} {v}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
