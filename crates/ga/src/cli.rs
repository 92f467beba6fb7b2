//! qemu-ga 7.2's command line and key-file config: the same options
//! (getopt style: `-pPATH`, `-p PATH`, `--path=PATH`, `--path PATH`,
//! `-F` with an optional attached argument), the `[general]` group of
//! `$QGA_CONF` (or `-c`, or /etc/qemu/qemu-ga.conf) read first, the command
//! line winning, and `-D` printing the effective config.

use std::path::PathBuf;

use crate::channel::{ISA_SERIAL_PATH, Method, VIRTIO_SERIAL_PATH};

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/qemu/qemu-ga.conf";
/// Default fsfreeze hook (for a bare `-F`).
pub const DEFAULT_HOOK: &str = "/etc/qemu/fsfreeze-hook";

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `-d`
    pub daemonize: bool,
    /// `-m`
    pub method: String,
    /// `-p`
    pub path: Option<String>,
    /// `-l`
    pub logfile: Option<String>,
    /// `-f`
    pub pidfile: String,
    /// `-F`
    pub fsfreeze_hook: Option<String>,
    /// `-t`
    pub statedir: String,
    /// `-v`
    pub verbose: bool,
    /// `-r`
    pub retry_path: bool,
    /// `-b` (accumulated)
    pub block_rpcs: Vec<String>,
    /// `-a` (accumulated; a later qemu-ga option)
    pub allow_rpcs: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            daemonize: false,
            method: "virtio-serial".into(),
            path: None,
            logfile: None,
            pidfile: "/var/run/qemu-ga.pid".into(),
            fsfreeze_hook: None,
            statedir: "/var/run".into(),
            verbose: false,
            retry_path: false,
            block_rpcs: Vec::new(),
            allow_rpcs: Vec::new(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Run the agent.
    Run(Config),
    /// Print the config (`-D`).
    Dump(Config),
    /// Print the version (`-V`).
    Version,
    /// Print help (`-h`).
    Help,
    /// List the RPC names (`-b help`).
    ListRpcs,
}

/// Command-line and config errors (exit status 1, as qemu-ga).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An unknown option (getopt's complaint, without the program name).
    #[error("{0}")]
    Unknown(String),
    /// An option without its argument.
    #[error("option '{0}' requires an argument")]
    MissingArgument(String),
    /// The config file could not be read or parsed.
    #[error("failed to load config file {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

const WITH_ARG: &[(char, &str)] = &[
    ('m', "method"),
    ('p', "path"),
    ('l', "logfile"),
    ('f', "pidfile"),
    ('t', "statedir"),
    ('b', "block-rpcs"),
    ('a', "allow-rpcs"),
    ('c', "config"),
    ('s', "service"),
];
const NO_ARG: &[(char, &str)] = &[
    ('h', "help"),
    ('V', "version"),
    ('v', "verbose"),
    ('d', "daemonize"),
    ('D', "dump-conf"),
    ('r', "retry-path"),
];

/// qemu-ga's `split_list`: the items in reverse order (it prepends each
/// to a GList), which `-D` and the order of disabling show.
fn split_list(s: &str) -> impl Iterator<Item = String> + '_ {
    s.rsplit(',').filter(|x| !x.is_empty()).map(str::to_owned)
}

/// Applies the `[general]` group of a key file to `cfg`.
fn apply_keyfile(cfg: &mut Config, text: &str, path: &str) -> Result<(), CliError> {
    let mut group = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(g) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            group = g.to_owned();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(CliError::Config {
                path: path.into(),
                reason: format!("line {} is not a group, comment or key=value", n + 1),
            });
        };
        if group != "general" {
            continue;
        }
        let (key, value) = (key.trim(), value.trim());
        // g_key_file_get_boolean: only true/false/1/0; anything else
        // (`yes`, `TRUE`) is a fatal config error in qemu-ga.
        let flag = |v: &str| match v {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(CliError::Config {
                path: path.into(),
                reason: format!(
                    "Key file contains key \u{201c}{key}\u{201d} which has a value that cannot be interpreted."
                ),
            }),
        };
        match key {
            "daemon" => cfg.daemonize = flag(value)?,
            "method" => cfg.method = value.into(),
            "path" => cfg.path = Some(value.into()),
            "logfile" => cfg.logfile = Some(value.into()),
            "pidfile" => cfg.pidfile = value.into(),
            "fsfreeze-hook" => cfg.fsfreeze_hook = Some(value.into()),
            "statedir" => cfg.statedir = value.into(),
            "verbose" => cfg.verbose = flag(value)?,
            "retry-path" => cfg.retry_path = flag(value)?,
            // As qemu-ga 7.2: one raw string split on commas.
            "block-rpcs" | "blacklist" => cfg.block_rpcs = split_list(value).collect(),
            "allow-rpcs" => cfg.allow_rpcs = split_list(value).collect(),
            _ => {}
        }
    }
    Ok(())
}

/// Parses `args` (without argv[0]); `conf_env` is `$QGA_CONF`.
pub fn parse(args: &[String], conf_env: Option<String>) -> Result<Action, CliError> {
    // Options in order, long names normalised to their short letter.
    let mut opts: Vec<(char, Option<String>)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            // getopt: the rest are operands, which qemu-ga ignores.
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            let name = if name == "blacklist" {
                "block-rpcs"
            } else {
                name
            };
            if name == "fsfreeze-hook" {
                opts.push(('F', inline));
            } else if let Some(&(c, _)) = WITH_ARG.iter().find(|(_, l)| *l == name) {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .cloned()
                            .ok_or_else(|| CliError::MissingArgument(a.clone()))?;
                        i += 1;
                        v
                    }
                };
                opts.push((c, Some(v)));
            } else if let Some(&(c, _)) = NO_ARG.iter().find(|(_, l)| *l == name) {
                if inline.is_some() {
                    return Err(CliError::Unknown(format!(
                        "option '--{name}' doesn't allow an argument"
                    )));
                }
                opts.push((c, None));
            } else {
                return Err(CliError::Unknown(format!("unrecognized option '{a}'")));
            }
        } else if let Some(short) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let chars: Vec<char> = short.chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let rest: String = chars[j..].iter().collect();
                if c == 'F' {
                    opts.push(('F', (!rest.is_empty()).then_some(rest)));
                    break;
                } else if WITH_ARG.iter().any(|(s, _)| *s == c) {
                    let v = if !rest.is_empty() {
                        rest
                    } else {
                        let v = args
                            .get(i)
                            .cloned()
                            .ok_or_else(|| CliError::MissingArgument(format!("-{c}")))?;
                        i += 1;
                        v
                    };
                    opts.push((c, Some(v)));
                    break;
                } else if NO_ARG.iter().any(|(s, _)| *s == c) {
                    opts.push((c, None));
                } else {
                    return Err(CliError::Unknown(format!("invalid option -- '{c}'")));
                }
            }
        }
        // A non-option argument: getopt_long moves it to the end and
        // qemu-ga ignores it.
    }
    let mut cfg = Config::default();
    let explicit = opts
        .iter()
        .rev()
        .find(|(c, _)| *c == 'c')
        .and_then(|(_, v)| v.clone());
    let conf = explicit
        .clone()
        .or(conf_env)
        .unwrap_or_else(|| DEFAULT_CONFIG.to_owned());
    match std::fs::read_to_string(&conf) {
        Ok(text) => apply_keyfile(&mut cfg, &text, &conf)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {}
        Err(e) => {
            return Err(CliError::Config {
                path: conf,
                reason: e.to_string(),
            });
        }
    }
    let mut action = None;
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        match c {
            'm' => cfg.method = v,
            'p' => cfg.path = Some(v),
            'l' => cfg.logfile = Some(v),
            'f' => cfg.pidfile = v,
            't' => cfg.statedir = v,
            'F' => {
                cfg.fsfreeze_hook = Some(if v.is_empty() {
                    DEFAULT_HOOK.to_owned()
                } else {
                    v
                })
            }
            'b' => {
                if v == "help" || v == "?" {
                    return Ok(Action::ListRpcs);
                }
                cfg.block_rpcs.extend(split_list(&v));
            }
            'a' => {
                if v == "help" || v == "?" {
                    return Ok(Action::ListRpcs);
                }
                cfg.allow_rpcs.extend(split_list(&v));
            }
            'v' => cfg.verbose = true,
            'd' => cfg.daemonize = true,
            'r' => cfg.retry_path = true,
            'D' => action = Some('D'),
            'V' => return Ok(Action::Version),
            'h' => return Ok(Action::Help),
            _ => {}
        }
    }
    if action == Some('D') {
        return Ok(Action::Dump(cfg));
    }
    Ok(Action::Run(cfg))
}

impl CliError {
    /// Whether this is a usage error (getopt's '?'), which qemu-ga answers
    /// with its "Unknown option" line on stdout.
    pub fn is_usage(&self) -> bool {
        matches!(self, CliError::Unknown(_) | CliError::MissingArgument(_))
    }
}

/// qemu-ga's answer on stdout to a usage error, `argv0` as invoked.
pub fn usage_hint(argv0: &str) -> String {
    format!("Unknown option, try '{argv0} --help' for more information.\n")
}

impl Config {
    /// The channel path: `-p`, or the method's default.
    pub fn channel_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.path {
            return Some(p.into());
        }
        match Method::parse(&self.method)? {
            Method::VirtioSerial => Some(VIRTIO_SERIAL_PATH.into()),
            Method::IsaSerial => Some(ISA_SERIAL_PATH.into()),
            _ => None,
        }
    }

    /// The `-D` key file, in qemu-ga's key order.
    pub fn dump(&self) -> String {
        let mut s = String::from("[general]\n");
        s += &format!("daemon={}\n", self.daemonize);
        s += &format!("method={}\n", self.method);
        if let Some(p) = self.channel_path() {
            s += &format!("path={}\n", p.display());
        }
        if let Some(l) = &self.logfile {
            s += &format!("logfile={l}\n");
        }
        s += &format!("pidfile={}\n", self.pidfile);
        if let Some(h) = &self.fsfreeze_hook {
            s += &format!("fsfreeze-hook={h}\n");
        }
        s += &format!("statedir={}\n", self.statedir);
        s += &format!("verbose={}\n", self.verbose);
        s += &format!("retry-path={}\n", self.retry_path);
        s += &format!("block-rpcs={}\n", self.block_rpcs.join(","));
        if !self.allow_rpcs.is_empty() {
            s += &format!("allow-rpcs={}\n", self.allow_rpcs.join(","));
        }
        s
    }
}

/// `-h` text.
pub const HELP: &str = "Usage: qvirt-ga [-m <method> -p <path>] [<options>]
qvirt-ga, a QEMU Guest Agent 7.2 compatible agent

  -m, --method      transport method: one of unix-listen, virtio-serial,
                    isa-serial, or vsock-listen (virtio-serial is the default)
  -p, --path        device/socket path (the default for virtio-serial is:
                    /dev/virtio-ports/org.qemu.guest_agent.0,
                    the default for isa-serial is:
                    /dev/ttyS0).
  -l, --logfile     set logfile path, logs to stderr by default
  -f, --pidfile     specify pidfile (default is /var/run/qemu-ga.pid)
  -F, --fsfreeze-hook
                    enable fsfreeze hook. Accepts an optional argument that
                    specifies script to run on freeze/thaw. Script will be
                    called with 'freeze'/'thaw' arguments accordingly.
                    (default is /etc/qemu/fsfreeze-hook)
                    If using -F with an argument, do not follow -F with a
                    space.
  -t, --statedir    specify dir to store state information (absolute paths
                    only, default is /var/run)
  -v, --verbose     log extra debugging information
  -V, --version     print version information and exit
  -d, --daemonize   become a daemon
  -b, --block-rpcs  comma-separated list of RPCs to disable (no spaces,
                    use \"help\" to list available RPCs)
  -a, --allow-rpcs  comma-separated list of RPCs to enable (all others are
                    disabled; use \"help\" to list available RPCs)
  -c, --config      read this config file (must exist; default $QGA_CONF
                    or /etc/qemu/qemu-ga.conf)
  -D, --dump-conf   dump a qemu-ga config file based on current config
                    options / command-line parameters to stdout
  -r, --retry-path  attempt re-opening path if it's unavailable or closed
  -h, --help        display this help and exit
";

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Action {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&args, Some("/nonexistent/qga.conf".into())).expect("parse")
    }

    #[test]
    fn test_cli_table() {
        let want = Config {
            method: "unix-listen".into(),
            path: Some("/s".into()),
            statedir: "/st".into(),
            block_rpcs: vec![
                "guest-info".into(),
                "guest-ping".into(),
                "guest-exec".into(),
            ],
            fsfreeze_hook: Some(DEFAULT_HOOK.into()),
            ..Config::default()
        };
        assert_eq!(
            p(&[
                "-m",
                "unix-listen",
                "-p/s",
                "--statedir=/st",
                "-b",
                "guest-ping,guest-info",
                "--block-rpcs",
                "guest-exec",
                "-F"
            ]),
            Action::Run(want)
        );
        assert_eq!(p(&["-V"]), Action::Version);
        assert_eq!(p(&["-h"]), Action::Help);
        assert_eq!(p(&["-b", "help"]), Action::ListRpcs);
        match p(&["-F/h", "-D"]) {
            Action::Dump(c) => assert_eq!(c.fsfreeze_hook.as_deref(), Some("/h")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_strict_booleans_operands_and_flag_arguments() {
        for bad in ["verbose=yes", "daemon=TRUE", "retry-path=True", "verbose="] {
            let mut c = Config::default();
            let text = format!("[general]\n{bad}\n");
            assert!(apply_keyfile(&mut c, &text, "x").is_err(), "{bad}");
        }
        let mut c = Config::default();
        apply_keyfile(&mut c, "[general]\nverbose= 1 \ndaemon=0\n", "x").expect("ok");
        assert!(c.verbose && !c.daemonize);
        let run = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            parse(&args, Some("/nonexistent/qga.conf".into()))
        };
        assert!(matches!(run(&["x", "-D", "y"]), Ok(Action::Dump(_))));
        assert!(matches!(run(&["-D", "--", "-V"]), Ok(Action::Dump(_))));
        assert!(matches!(run(&["--help=3"]), Err(e) if e.is_usage()));
        assert!(matches!(run(&["-m"]), Err(e) if e.is_usage()));
        match run(&["-b", "a,b", "--block-rpcs=c,d", "-D"]) {
            Ok(Action::Dump(c)) => assert_eq!(c.block_rpcs, ["b", "a", "d", "c"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_dump_matches_qemu_ga_default() {
        assert_eq!(
            Config::default().dump(),
            "[general]\ndaemon=false\nmethod=virtio-serial\npath=/dev/virtio-ports/org.qemu.guest_agent.0\npidfile=/var/run/qemu-ga.pid\nstatedir=/var/run\nverbose=false\nretry-path=false\nblock-rpcs=\n"
        );
    }

    #[test]
    fn test_config_file_block_rpcs_is_comma_split() {
        let mut c = Config::default();
        apply_keyfile(
            &mut c,
            "[general]\nblock-rpcs=guest-ping;guest-get-time\nverbose=true\n",
            "x",
        )
        .expect("ok");
        assert_eq!(c.block_rpcs, vec!["guest-ping;guest-get-time".to_owned()]);
        assert!(c.verbose);
    }
}
