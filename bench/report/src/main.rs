//! `confab-bench-report`: reads the JSON results of one `bench/run.sh` results folder and
//! writes Markdown tables (each target's median over its runs, with ratios to the floor and to
//! the best peer) and PNG plots.
//!
//! ```text
//! confab-bench-report RESULTS_DIR [--out FILE.md] [--plots DIR | --no-plots]
//! ```
//! Tables go to stdout, or to `--out` (which then also embeds the plots); plots go to
//! `RESULTS_DIR/plots` unless `--plots` says otherwise.

mod plots;
mod results;
mod summary;
mod tables;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str =
    "usage: confab-bench-report RESULTS_DIR [--out FILE.md] [--plots DIR | --no-plots]";

/// Command-line options.
struct Options {
    results: PathBuf,
    out: Option<PathBuf>,
    plots: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut results = None;
    let mut out = None;
    let mut plots = Some(None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = Some(args.next().ok_or("--out needs a file")?.into()),
            "--plots" => plots = Some(Some(args.next().ok_or("--plots needs a folder")?.into())),
            "--no-plots" => plots = None,
            "-h" | "--help" => return Err(USAGE.into()),
            _ if results.is_none() && !arg.starts_with('-') => results = Some(PathBuf::from(arg)),
            _ => return Err(format!("unexpected argument {arg:?}\n{USAGE}")),
        }
    }
    let results: PathBuf = results.ok_or(USAGE)?;
    let plots = plots.map(|dir| dir.unwrap_or_else(|| results.join("plots")));
    Ok(Options {
        results,
        out,
        plots,
    })
}

/// `path` relative to `base` when it lies under it (for image links in the Markdown).
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    absolute(path)
        .strip_prefix(absolute(base))
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse_args()?;
    let (runs, warnings) = results::load_dir(&options.results)
        .map_err(|e| format!("cannot read {}: {e}", options.results.display()))?;
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if runs.is_empty() {
        return Err(format!("no results in {}", options.results.display()).into());
    }
    let groups = summary::group(&runs);
    let mut markdown = tables::markdown(&groups);
    if let Some(dir) = &options.plots {
        plots::register_font()?;
        let written = plots::all(&groups, dir)?;
        for path in &written {
            eprintln!("wrote {}", path.display());
        }
        if let Some(out) = &options.out {
            let base = out.parent().unwrap_or(Path::new("."));
            markdown.push_str("\n## Plots\n");
            for path in &written {
                let name = path.file_stem().unwrap_or_default().to_string_lossy();
                let link = relative_to(path, base);
                markdown.push_str(&format!("\n![{name}]({})\n", link.display()));
            }
        }
    }
    match &options.out {
        Some(out) => {
            std::fs::write(out, &markdown)?;
            eprintln!("wrote {}", out.display());
        }
        None => print!("{markdown}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("confab-bench-report: {error}");
            ExitCode::FAILURE
        }
    }
}
