//! Repository-name and tag grammar of the OCI Distribution Spec, checked without regexes.

/// Longest repository name accepted (the spec's recommended limit).
pub const MAX_NAME_LEN: usize = 255;

/// True when `name` matches
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`
/// and is at most 255 characters. This grammar also rules out `..`, empty components and
/// leading `_`, so a valid name can never escape or collide with a storage key.
pub fn is_valid_repository_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('/').all(is_valid_component)
}

fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// True when `tag` matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || b"._-".contains(&x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "library/ubuntu", "a.b_c__d---e/f0", "functions/hello-world"] {
            assert!(is_valid_repository_name(ok), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "A",
            "a/../b",
            "..",
            "a//b",
            "/a",
            "a/",
            "_a",
            "a_",
            "a___b",
            "a..b",
            "a/_layers",
            "a b",
            &long,
        ] {
            assert!(!is_valid_repository_name(bad), "{bad}");
        }
        assert!(is_valid_repository_name(&"a".repeat(255)));
    }

    #[test]
    fn tags() {
        assert!(is_valid_tag("v1.0-rc_1"));
        assert!(is_valid_tag("_x"));
        assert!(!is_valid_tag(".x"));
        assert!(!is_valid_tag("-x"));
        assert!(!is_valid_tag(&"a".repeat(129)));
        assert!(!is_valid_tag("a/b"));
    }
}
