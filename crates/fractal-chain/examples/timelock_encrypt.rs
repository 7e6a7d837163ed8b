//! `timelock_encrypt ROUND HEX`: prints the hex of HEX's bytes encrypted to
//! drand quicknet round ROUND, as a CRv4 commit carries them. Used by
//! tools/interop/drand_vectors.sh to hand our ciphertexts to the reference
//! implementation.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [round, plaintext] = args.as_slice() else {
        eprintln!("usage: timelock_encrypt ROUND HEX");
        std::process::exit(2);
    };
    let round: u64 = round.parse().expect("ROUND is a number");
    let plaintext = hex::decode(plaintext).expect("HEX is hex");
    let ct = fractal_chain::subtensor::timelock::encrypt(&plaintext, round);
    println!("{}", hex::encode(ct));
}
