//! qvirt-ga: a qemu-ga 7.2 compatible guest agent. See the library.

fn main() {
    let argv0 = std::env::args().next().unwrap_or_else(|| "qvirt-ga".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
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
