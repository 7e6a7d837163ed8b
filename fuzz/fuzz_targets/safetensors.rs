#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fractal_fuzz::safetensors(data);
});
