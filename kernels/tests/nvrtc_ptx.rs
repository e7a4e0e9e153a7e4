//! Every kernel source compiles to PTX for sm_80 and sm_90 through NVRTC —
//! on machines without a GPU too (NVRTC needs no driver). CI provides NVRTC
//! from PyPI (scripts/fetch-nvrtc.sh) and sets RLHF_REQUIRE_NVRTC=1, so a
//! missing NVRTC fails there instead of skipping.

use rlhf_kernels::cuda::{compile, kernel_names, loader};

fn nvrtc_or_skip(test: &str) -> bool {
    match loader::require(loader::NVRTC) {
        Ok(_) => true,
        Err(e) if std::env::var_os("RLHF_REQUIRE_NVRTC").is_none() => {
            eprintln!("SKIPPED {test}: {e} (run `eval \"$(scripts/fetch-nvrtc.sh)\"` first)");
            false
        }
        Err(e) => panic!("RLHF_REQUIRE_NVRTC is set but NVRTC is unusable: {e}"),
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") {
        return;
    }
    let names = kernel_names();
    assert!(names.len() >= 2, "kernel scan found {names:?}");
    for arch in ["sm_80", "sm_90"] {
        let ptx = compile::compile(arch)
            .unwrap_or_else(|e| panic!("{arch}: {e}"))
            .to_src();
        assert!(
            ptx.contains(&format!(".target {arch}")),
            "{arch}: wrong target"
        );
        for name in &names {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} missing from the PTX"
            );
        }
    }
}

#[test]
fn a_syntax_error_is_reported_with_file_and_line() {
    if !nvrtc_or_skip("a_syntax_error_is_reported_with_file_and_line") {
        return;
    }
    // The same options as the real compile, on a broken source.
    let err = compile::compile_source(
        "#line 1 \"broken.cu\"\nextern \"C\" __global__ void k() { int x = ; }\n",
        "sm_80",
    )
    .expect_err("a broken kernel must not compile");
    let msg = err.to_string();
    assert!(
        msg.contains("broken.cu") && msg.contains("(1)"),
        "error without location: {msg}"
    );
}
