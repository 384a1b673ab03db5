//! Prints every cvmp.io CRD as multi-document YAML; `--write` also refreshes the committed
//! `crds/generated/crds.yaml`, the chart's template and `docs/api.md`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let write = std::env::args().skip(1).any(|a| a == "--write");
    let yaml = match cvm_crds::crds_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !write {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let docs = match cvm_crds::docs::api_markdown() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Paths are relative to this crate so the command works from any directory.
    let chart = match cvm_crds::schema::chart_crds_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let targets = [
        (crate_dir.join("generated/crds.yaml"), yaml),
        // A template, so that `helm upgrade` updates the CRDs.
        (
            crate_dir.join("../charts/cvm-operator/templates/crds.yaml"),
            chart,
        ),
        (crate_dir.join("../docs/api.md"), docs),
    ];
    for (path, text) in targets {
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(e) = result {
            eprintln!("crdgen: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
