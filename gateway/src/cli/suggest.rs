//! `egress-gateway policy suggest`: read audit logs (plain, gzip, stdin),
//! stream them into the learn-mode aggregator and write the suggested policy
//! and its tests. The logic lives in `egress_policy::suggest`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use egress_policy::suggest::{self, Aggregator, AuditEntry, Current, Options};
use egress_policy::Mode;
use flate2::read::MultiGzDecoder;

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// Audit log files, one JSON object per line; `-` reads stdin; gzip is detected.
    #[arg(required = true, value_name = "AUDIT.log")]
    pub logs: Vec<PathBuf>,
    /// The current policy; suggestions are added to it and its agent names kept.
    #[arg(long, value_name = "POLICY.yaml")]
    pub policy: Option<PathBuf>,
    /// Directory for suggested-policy.yaml, suggested-tests.yaml and the schemas.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub out: PathBuf,
    /// Propose only destinations seen at least N times.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_count: u64,
    /// Distinct subdomains of one registrable domain needed for a `*.domain` entry (0: never).
    #[arg(long, default_value_t = 3, value_name = "K")]
    pub wildcard_min: usize,
    /// Ignore audit records before this RFC 3339 time.
    #[arg(long, value_name = "RFC3339")]
    pub since: Option<String>,
    /// Set the suggested policy's mode (default: keep the current one; audit for a new policy).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Only read and parse the logs, then print counts (a baseline for timing).
    #[arg(long)]
    pub parse_only: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Enforce,
    Audit,
}

const INVALID_INPUT: u8 = 2;
/// Malformed lines printed in full; the rest are only counted.
const SHOWN_MALFORMED: usize = 20;

pub fn run(args: SuggestArgs) -> ExitCode {
    let since_ms = match args
        .since
        .as_deref()
        .map(|s| (s, suggest::parse_rfc3339(s)))
    {
        None => None,
        Some((_, Some(ms))) => Some(ms),
        Some((s, None)) => {
            eprintln!("error: --since {s:?}: not an RFC 3339 time (e.g. 2025-01-31T00:00:00Z)");
            return ExitCode::from(INVALID_INPUT);
        }
    };
    let current_text = match &args.policy {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {}: cannot read: {e}", p.display());
                return ExitCode::from(INVALID_INPUT);
            }
        },
        None => None,
    };
    let options = Options {
        min_count: args.min_count,
        wildcard_min: args.wildcard_min,
        since_ms,
        mode: args.mode.map(|m| match m {
            ModeArg::Enforce => Mode::Enforce,
            ModeArg::Audit => Mode::Audit,
        }),
        ..Options::default()
    };
    let mut agg = Aggregator::new(options);
    let mut malformed = 0u64;
    let mut lines = 0u64;
    for path in &args.logs {
        let reader = match open(path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {}: cannot read: {e}", path.display());
                return ExitCode::from(INVALID_INPUT);
            }
        };
        let mut report = |line: u64, why: &str| {
            malformed += 1;
            if malformed as usize <= SHOWN_MALFORMED {
                eprintln!(
                    "warning: {}:{line}: malformed audit line: {why}",
                    path.display()
                );
            }
        };
        let res = read_lines(reader, |n, text| {
            lines += 1;
            match serde_json::from_str::<AuditEntry<'_>>(text) {
                Ok(entry) if args.parse_only => {
                    std::hint::black_box(&entry);
                }
                Ok(entry) => {
                    if let Err(e) = agg.add(&entry) {
                        report(n, &e.to_string());
                    }
                }
                Err(e) => report(n, &e.to_string()),
            }
        });
        if let Err(e) = res {
            eprintln!("error: {}: read failed: {e}", path.display());
            return ExitCode::from(INVALID_INPUT);
        }
    }
    if malformed > 0 {
        eprintln!(
            "{malformed} malformed audit lines skipped{}",
            if malformed as usize > SHOWN_MALFORMED {
                format!(" (first {SHOWN_MALFORMED} shown)")
            } else {
                String::new()
            }
        );
    }
    if args.parse_only {
        println!("{lines} lines read, {malformed} malformed");
        return ExitCode::SUCCESS;
    }
    let counts = agg.counts();
    println!(
        "{lines} audit lines: {} used, {} before --since, {malformed} malformed; {} distinct (source, destination, method)",
        counts.used,
        counts.before_since,
        agg.distinct()
    );
    if counts.used == 0 && current_text.is_none() {
        println!("no audit records and no --policy: nothing to suggest, nothing written");
        return ExitCode::SUCCESS;
    }
    let origin = args
        .policy
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let current = current_text.as_deref().map(|text| Current {
        text,
        origin: &origin,
    });
    let s = match suggest::suggest(agg, current) {
        Ok(s) => s,
        Err(suggest::SuggestError::Policy(e)) => {
            for e in e.errors() {
                eprintln!("error: {e}");
            }
            return ExitCode::from(INVALID_INPUT);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Files first: a closed stdout (`| head`) must not lose the suggestion.
    match write_out(&args.out, &s) {
        Ok(()) => {
            print!("{}", s.summary);
            println!(
                "wrote {} and {} ({} test cases)",
                args.out.join("suggested-policy.yaml").display(),
                args.out.join("suggested-tests.yaml").display(),
                s.test_cases
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", args.out.display());
            ExitCode::FAILURE
        }
    }
}

fn write_out(dir: &Path, s: &suggest::Suggestion) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("suggested-policy.yaml"), &s.policy_yaml)?;
    std::fs::write(dir.join("suggested-tests.yaml"), &s.tests_yaml)?;
    // The files' `$schema=` lines point here, so editors validate them in place.
    std::fs::write(
        dir.join("policy.schema.json"),
        egress_policy::schema::policy_schema_json(),
    )?;
    std::fs::write(
        dir.join("policy-tests.schema.json"),
        egress_policy::schema::tests_schema_json(),
    )?;
    Ok(())
}

/// A file (`-`: stdin), decompressed when it starts with the gzip magic.
fn open(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    let raw: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(File::open(path)?)
    };
    let mut buf = BufReader::with_capacity(1 << 16, raw);
    let gz = buf.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz {
        Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(buf)))
    } else {
        Box::new(buf)
    })
}

/// Calls `f(line_number, text)` for every non-blank line; invalid UTF-8 is
/// passed on as text that fails to parse, so it is reported, not fatal.
fn read_lines(mut r: Box<dyn BufRead>, mut f: impl FnMut(u64, &str)) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut n = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        n += 1;
        let line = match std::str::from_utf8(&buf) {
            Ok(s) => s.trim_end_matches(['\n', '\r']),
            Err(_) => "\u{0}not UTF-8",
        };
        if line.trim().is_empty() {
            continue;
        }
        f(n, line);
    }
}
