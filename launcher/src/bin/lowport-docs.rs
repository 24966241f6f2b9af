//! `lowport-docs DIR`: writes lowport's man pages (`DIR/man1/lowport.1`, `lowport-run.1` and one per
//! other subcommand, such as `lowport-exec.1`) and its bash,
//! zsh and fish completions (`DIR/completions/`), generated from the same clap definitions that
//! `lowport` parses its command line with. `make install` runs it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("lowport-docs: usage: lowport-docs DIR (writes DIR/man1 and DIR/completions)");
        return ExitCode::from(2);
    };
    match write_all(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lowport-docs: cannot write to {}: {err}", dir.display());
            ExitCode::from(1)
        }
    }
}

fn write_all(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    let command = lowport::cli::command();
    clap_mangen::generate_to(command.clone(), &man)?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command.clone(), "lowport", &completions)?;
    }
    Ok(())
}
