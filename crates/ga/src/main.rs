//! qvirt-ga: a qemu-ga 7.2 compatible guest agent. See the library.

fn main() {
    // args_os: paths need not be UTF-8 (std::env::args would panic).
    let mut argv = std::env::args_os();
    let argv0 = argv
        .next()
        .map_or_else(|| "qvirt-ga".into(), |a| a.to_string_lossy().into_owned());
    let args: Vec<std::ffi::OsString> = argv.collect();
    if let Err(err) = qvirt_ga::run(&args) {
        if let qvirt_ga::GaError::Cli(cli) = &err
            && cli.is_usage()
        {
            // As getopt and qemu-ga: the complaint on stderr, the hint on
            // stdout.
            eprintln!("{argv0}: {cli}");
            print!("{}", qvirt_ga::cli::usage_hint(&argv0));
        } else if !err.logged() {
            eprintln!("qvirt-ga: {}", qvirt_ga::error_chain(&err));
        }
        std::process::exit(1);
    }
}
