//! The man pages and the bash completion that the package ships, generated
//! from the command-line definition (`migsafe generate-assets`): man renders
//! every page without a warning and with the sections an operator looks
//! for, and bash with the completion sourced completes `ctl` command names.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn generate(dir: &Path) {
    run(Command::new(BIN).arg("generate-assets").arg(dir));
}

/// What bash offers for the last word of `words` with `script` sourced.
pub fn complete(script: &Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source /usr/share/bash-completion/bash_completion\n\
         source '{script}'\n\
         COMP_WORDS=({words})\n\
         COMP_CWORD={cword}\n\
         COMP_LINE='{line}'\n\
         COMP_POINT=${{#COMP_LINE}}\n\
         _migsafe migsafe '{cur}' '{prev}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script = script.display(),
        words = quoted.join(" "),
        cword = words.len() - 1,
        cur = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    let out = run(Command::new("bash").arg("-c").arg(prog));
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn bash_completes_ctl_command_names() {
    if !Path::new("/usr/share/bash-completion/bash_completion").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "bash-completion is not installed but CI must provide it"
        );
        eprintln!("SKIPPED: bash-completion is not installed");
        return;
    }
    let dir = scratch();
    generate(dir.path());
    let script = dir.path().join("completions/migsafe");
    assert_eq!(
        complete(&script, &["migsafe", "ctl", "/run/migsafe", "ac"]),
        ["activate"]
    );
    assert_eq!(
        complete(&script, &["migsafe", "ctl", "/run/migsafe", "in"]),
        ["inactivate", "invalidate"]
    );
    // Control: a prefix of no command completes to nothing.
    assert!(complete(&script, &["migsafe", "ctl", "/run/migsafe", "zz"]).is_empty());
    // Subcommands, doctor among them; the hidden generator is not offered.
    let subs = complete(&script, &["migsafe", ""]);
    for want in ["ctl", "doctor", "mount", "residency"] {
        assert!(subs.iter().any(|s| s == want), "{subs:?}");
    }
    assert!(!subs.iter().any(|s| s == "generate-assets"), "{subs:?}");
}

#[test]
fn man_pages_render_without_warnings() {
    if !have_tool("man") {
        return;
    }
    let dir = scratch();
    generate(dir.path());
    let pages = [
        (
            "migsafe.8",
            &["EXIT STATUS", "FILES", "EXAMPLES", "doctor"][..],
        ),
        (
            "migsafe-mount.8",
            &[
                "MOUNT OPTIONS",
                "io=auto|passthrough|relay|cached",
                "--device",
            ][..],
        ),
        (
            "migsafe-ctl.8",
            &["CONTROL FILES", "RESULT LINES", "EXIT STATUS", "activate"][..],
        ),
        ("migsafe-residency.8", &["--evict"][..]),
        ("migsafe-doctor.8", &["CHECKS", "EXIT STATUS", "--json"][..]),
        ("migsafe-upgrade.8", &["MOUNTPOINT", "keeper"][..]),
    ];
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("man8"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<&str> = pages.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, needles) in pages {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(dir.path().join("man8").join(name))
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "man -l {name}: {warnings}");
        assert!(
            warnings.trim().is_empty(),
            "man -l {name} warns:\n{warnings}"
        );
        for needle in needles {
            assert!(text.contains(needle), "{name} lacks {needle:?}:\n{text}");
        }
    }
}

/// `--help` shows the same words the man page carries (one definition).
#[test]
fn help_shows_the_manual_sections() {
    let out = run(Command::new(BIN).args(["ctl", "--help"]));
    for needle in [
        "Control files:",
        "Result lines:",
        "Exit status:",
        "activate:",
    ] {
        assert!(out.contains(needle), "ctl --help lacks {needle:?}:\n{out}");
    }
    let out = run(Command::new(BIN).args(["mount", "--help"]));
    assert!(out.contains("Mount options:"), "{out}");
}
