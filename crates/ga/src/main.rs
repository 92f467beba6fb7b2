//! qvirt-ga: a qemu-ga 7.2 compatible guest agent. See the library.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(err) = qvirt_ga::run(&args) {
        let mut line = err.to_string();
        let mut cause = std::error::Error::source(&err);
        while let Some(c) = cause {
            line.push_str(": ");
            line.push_str(&c.to_string());
            cause = c.source();
        }
        eprintln!("qvirt-ga: {line}");
        std::process::exit(1);
    }
}
