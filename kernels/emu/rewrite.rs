//! The source rewrite that makes the CUDA program compile as host C++ for the
//! emulator (kernels/emu/emu.h). Shared by the kernel tests (harness.rs) and
//! the fake CUDA libraries (fake/mod.rs, `rlhf_kernels::emu`).

/// The program with inline PTX and dynamic shared memory made emulable (see
/// the module doc). Line numbers are kept (a multi-line statement becomes its
/// replacement followed by as many newlines), so the `#line` markers of
/// `program_source()` still name the right lines.
pub fn rewrite(src: &str) -> Result<String, String> {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len() + 1024);
    let mut i = 0;
    let mut depth = 0i32; // brace depth: 0 = file scope
    let mut line = 1usize;
    while i < b.len() {
        let c = b[i];
        // Comments and literals are copied as they are.
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
            out.push_str(&src[i..end]);
            i = end;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = src[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            line += src[i..end].matches('\n').count();
            out.push_str(&src[i..end]);
            i = end;
            continue;
        }
        if c == b'"' || c == b'\'' {
            let end = skip_literal(b, i);
            out.push_str(&src[i..end]);
            i = end;
            continue;
        }
        if c == b'\n' {
            line += 1;
        }
        if c == b'{' {
            depth += 1;
        }
        if c == b'}' {
            depth -= 1;
        }
        if is_ident_start(c) && (i == 0 || !is_ident(b[i - 1])) {
            let end = ident_end(b, i);
            let word = &src[i..end];
            if word == "asm" || word == "__asm__" || word == "__asm" {
                let (stmt_end, text) = rewrite_asm(src, end)
                    .map_err(|e| format!("line {line} of the program: {e}"))?;
                let newlines = src[i..stmt_end].matches('\n').count();
                out.push_str(&text);
                out.extend(std::iter::repeat_n('\n', newlines));
                line += newlines;
                i = stmt_end;
                continue;
            }
            if word == "__shared__" {
                // `__shared__ <type> name[..];`: a static variable, registered
                // with the emulator (which poisons it once per block and maps
                // it into the shared window for ldmatrix).
                let semi = src[end..]
                    .find(';')
                    .map(|e| end + e)
                    .ok_or("__shared__ without ;")?;
                let decl = &src[end..semi];
                let name = shared_name(decl).ok_or_else(|| {
                    format!("line {line} of the program: cannot read `__shared__{decl};`")
                })?;
                let newlines = decl.matches('\n').count();
                let decl = decl.replace('\n', " ");
                if depth == 0 {
                    out.push_str(&format!(
                        "static{decl}; static ::emu::FileShared emu_file_shared_{name}(&{name}, sizeof({name}));"
                    ));
                } else {
                    out.push_str(&format!(
                        "static{decl}; ::emu::shared_here(&{name}, sizeof({name}));"
                    ));
                }
                out.extend(std::iter::repeat_n('\n', newlines));
                line += newlines;
                i = semi + 1;
                continue;
            }
            if word == "extern" {
                let j = skip_space(b, end);
                if src[j..].starts_with("__shared__") && !is_ident(*b.get(j + 10).unwrap_or(&b' '))
                {
                    let semi = src[j..]
                        .find(';')
                        .map(|e| j + e)
                        .ok_or("extern __shared__ without ;")?;
                    let decl = &src[j + 10..semi];
                    let (ty, name) = shared_decl(decl).ok_or_else(|| {
                        format!(
                            "line {line} of the program: cannot read `extern __shared__{decl};`"
                        )
                    })?;
                    let newlines = src[i..semi].matches('\n').count();
                    if depth == 0 {
                        // A macro on a line of its own, then #line, so that the
                        // lines after keep their numbers.
                        if !out.ends_with('\n') {
                            out.push('\n');
                        }
                        out.push_str(&format!(
                            "#define {name} (reinterpret_cast<{ty}*>(::emu::g_dyn_base))\n#line {}",
                            line + newlines + 1
                        ));
                        line += newlines;
                        i = semi + 1;
                        continue;
                    } else {
                        out.push_str(&format!(
                            "{ty}* {name} = reinterpret_cast<{ty}*>(::emu::g_dyn_base);"
                        ));
                    }
                    out.extend(std::iter::repeat_n('\n', newlines));
                    line += newlines;
                    i = semi + 1;
                    continue;
                }
            }
            out.push_str(word);
            i = end;
            continue;
        }
        // Copy one UTF-8 character.
        let len = utf8_len(c);
        out.push_str(&src[i..i + len]);
        i += len;
    }
    Ok(out)
}

fn utf8_len(c: u8) -> usize {
    match c {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ident(b[i]) {
        i += 1;
    }
    i
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The end of the string or character literal starting at `i`.
fn skip_literal(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != q {
        if b[j] == b'\\' {
            j += 1;
        }
        j += 1;
    }
    (j + 1).min(b.len())
}

/// (type, name) of `extern __shared__ <decl>;` with `__align__(..)` dropped,
/// e.g. ` __align__(128) unsigned char attn_smem[]` → ("unsigned char", "attn_smem").
fn shared_decl(decl: &str) -> Option<(String, String)> {
    let mut d = decl.trim().to_string();
    while let Some(a) = d.find("__align__") {
        let close = d[a..].find(')')? + a;
        d.replace_range(a..=close, " ");
    }
    let d = d.trim().strip_suffix("[]")?.trim_end();
    let name_start = d.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))? + 1;
    let (ty, name) = (d[..name_start].trim(), &d[name_start..]);
    (!ty.is_empty() && !name.is_empty()).then(|| (ty.to_string(), name.to_string()))
}

/// The variable a `__shared__` declaration declares (one declarator only):
/// ` __align__(16) unsigned char smem[N]` → "smem".
fn shared_name(decl: &str) -> Option<String> {
    let d = decl.split('[').next()?.trim_end();
    if d.contains(',') || d.contains('=') {
        return None;
    }
    let start = d.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))? + 1;
    let name = &d[start..];
    (!name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit())).then(|| name.to_string())
}

/// Rewrites the asm statement whose keyword ends at `i`: returns the index
/// after its `;` and `::emu::ptx(template, {operands})`.
fn rewrite_asm(src: &str, mut i: usize) -> Result<(usize, String), String> {
    let b = src.as_bytes();
    // Qualifiers.
    loop {
        i = skip_space(b, i);
        let end = ident_end(b, i);
        match &src[i..end] {
            "volatile" | "__volatile__" | "__volatile" | "inline" => i = end,
            "goto" => return Err("asm goto is not emulated".into()),
            "" => break,
            w => return Err(format!("unexpected `{w}` after asm")),
        }
    }
    if b.get(i) != Some(&b'(') {
        return Err("asm without (".into());
    }
    // The parenthesised body, split at top-level colons.
    let mut sections = vec![String::new()];
    let mut depth = 0;
    let mut j = i + 1;
    loop {
        let c = *b.get(j).ok_or("unterminated asm")?;
        match c {
            b'"' | b'\'' => {
                let e = skip_literal(b, j);
                sections.last_mut().unwrap().push_str(&src[j..e]);
                j = e;
                continue;
            }
            // Comments become a space, newlines too (the replacement is one line).
            b'/' if b.get(j + 1) == Some(&b'/') => {
                j = src[j..].find('\n').map_or(b.len(), |e| j + e);
                continue;
            }
            b'/' if b.get(j + 1) == Some(&b'*') => {
                j = src[j + 2..].find("*/").map_or(b.len(), |e| j + 2 + e + 2);
                sections.last_mut().unwrap().push(' ');
                continue;
            }
            b'\n' | b'\r' => {
                sections.last_mut().unwrap().push(' ');
                j += 1;
                continue;
            }
            b'(' => depth += 1,
            b')' if depth == 0 => break,
            b')' => depth -= 1,
            b':' if depth == 0 && b.get(j + 1) != Some(&b':') && (j == 0 || b[j - 1] != b':') => {
                sections.push(String::new());
                j += 1;
                continue;
            }
            _ => {}
        }
        let len = utf8_len(c);
        sections.last_mut().unwrap().push_str(&src[j..j + len]);
        j += len;
    }
    let semi = skip_space(b, j + 1);
    if b.get(semi) != Some(&b';') {
        return Err("asm statement not followed by ;".into());
    }
    if sections.len() > 4 {
        return Err("asm with labels is not emulated".into());
    }
    let template = sections[0].trim().to_string();
    let mut ops = Vec::new();
    for (k, what) in [(1, "::emu::asm_out"), (2, "::emu::asm_in")] {
        let Some(sec) = sections.get(k) else { continue };
        for operand in split_top(sec, b',') {
            let operand = operand.trim();
            if operand.is_empty() {
                continue;
            }
            if operand.starts_with('[') {
                return Err(format!("named asm operand {operand} is not emulated"));
            }
            let open = operand
                .find('(')
                .ok_or_else(|| format!("asm operand {operand} without (expr)"))?;
            let constraint = operand[..open].trim();
            if !constraint.starts_with('"') {
                return Err(format!("asm operand {operand}: constraint expected"));
            }
            let expr = operand[open..].trim();
            ops.push(format!("{what}{expr}"));
        }
    }
    Ok((
        semi + 1,
        format!("::emu::ptx({template}, {{{}}});", ops.join(", ")),
    ))
}

/// `s` split at `sep` outside parentheses, brackets and literals.
fn split_top(s: &str, sep: u8) -> Vec<String> {
    let b = s.as_bytes();
    let (mut out, mut cur, mut depth, mut i) = (Vec::new(), String::new(), 0, 0);
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' {
            let e = skip_literal(b, i);
            cur.push_str(&s[i..e]);
            i = e;
            continue;
        }
        if c == b'(' || c == b'[' {
            depth += 1;
        }
        if c == b')' || c == b']' {
            depth -= 1;
        }
        if c == sep && depth == 0 {
            out.push(std::mem::take(&mut cur));
        } else {
            let len = utf8_len(c);
            cur.push_str(&s[i..i + len]);
            i += len;
            continue;
        }
        i += 1;
    }
    out.push(cur);
    out
}
