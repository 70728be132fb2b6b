//! `rollgate-proxy`: the native server binary (filled in by the native-server issue).

fn main() {
    println!(
        "rollgate-proxy {}: the native server lands with the native-server issue; \
         see README.md",
        env!("CARGO_PKG_VERSION")
    );
}
