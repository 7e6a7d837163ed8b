#![no_main]
libfuzzer_sys::fuzz_target!(
    init: {
        // decode_mp4 turns panics inside the mp4 crate into errors, which is
        // what callers get in production; libfuzzer-sys's hook would abort
        // on them first. Panics anywhere else still abort: the fuzz target
        // catches them and reports a crash.
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| {
        fractal_fuzz::mp4(data);
    }
);
