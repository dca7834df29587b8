//! The files the GNU C library reads for a process before its program's own code asks
//! for anything, as paths in the image.
//!
//! Lazily, each is one round trip with the link idle, since nothing a process has
//! read names them: the loader's cache (`/etc/ld.so.cache`) before any library, the
//! locale of `setlocale(LC_CTYPE, "")`, the character set conversions' cache, the
//! time zone of `tzset`. They are the same for every program of an image, and glibc's
//! own code fixes where they are, so the fetcher can fetch them with the program
//! ([`crate::Fetcher::will_run`]). Paths that the image lacks cost one lookup each.
//!
//! Everything here is a pure function of names; callers look the paths up in the
//! image's tree. Values come from the process's environment, so they are untrusted:
//! a name that could leave its directory gives no path.

/// The dynamic loader's cache, which glibc's loader reads before it opens a library.
pub const LOADER_CACHE: &str = "/etc/ld.so.cache";

/// The longest locale or time zone name taken (glibc's own limit on a locale name's
/// parts is far below it).
const MAX_NAME: usize = 255;

/// Whether `interp`, a program's interpreter (`PT_INTERP`), is glibc's dynamic loader
/// (`ld-linux-x86-64.so.2`, `ld-linux-aarch64.so.1`, `ld64.so.2` and so on), which
/// reads [`LOADER_CACHE`] first. musl's (`ld-musl-*.so.1`) reads none.
pub fn is_loader(interp: &str) -> bool {
    let name = interp.rsplit('/').next().unwrap_or(interp);
    name.starts_with("ld-linux") || name.starts_with("ld64.so.")
}

/// Whether `name` may be a path component glibc would put in a path: not empty, no
/// `/` and not `.` or `..` (glibc refuses a locale name that would leave its
/// directory), and not too long.
fn component(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
}

/// A codeset as glibc normalizes it for a locale's directory name: letters lowered,
/// digits kept, the rest dropped, and `iso` put before a codeset of digits only
/// (`UTF-8` is `utf8`).
fn normalized_codeset(codeset: &str) -> String {
    let kept: String = codeset
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if !kept.is_empty() && kept.chars().all(|c| c.is_ascii_digit()) {
        format!("iso{kept}")
    } else {
        kept
    }
}

/// The files glibc tries for locale category `category` (`LC_CTYPE`) of locale `name`
/// (`language[_territory][.codeset][@modifier]`, as the environment gives it), in its
/// order: the locale archive, the alias file, then the locale's directory under each
/// name it derives, most specific first (`en_US.UTF-8`, `en_US.utf8`, `en_US`,
/// `en.UTF-8`, `en.utf8`, `en`). `C` and `POSIX` are built in: none.
pub fn locale_files(name: &str, category: &str) -> Vec<String> {
    if name == "C" || name == "POSIX" || !component(name) || !component(category) {
        return Vec::new();
    }
    let (rest, modifier) = match name.split_once('@') {
        Some((r, m)) => (r, Some(m)),
        None => (name, None),
    };
    let (rest, codeset) = match rest.split_once('.') {
        Some((r, c)) => (r, Some(c)),
        None => (rest, None),
    };
    let (language, territory) = match rest.split_once('_') {
        Some((l, t)) => (l, Some(t)),
        None => (rest, None),
    };
    let mut codesets: Vec<Option<String>> = Vec::new();
    if let Some(c) = codeset {
        codesets.push(Some(c.to_string()));
        let n = normalized_codeset(c);
        if !n.is_empty() && n != c {
            codesets.push(Some(n));
        }
    }
    codesets.push(None);
    let mut out = vec![
        "/usr/lib/locale/locale-archive".to_string(),
        "/usr/share/locale/locale.alias".to_string(),
    ];
    let territories: Vec<Option<&str>> = match territory {
        Some(t) => vec![Some(t), None],
        None => vec![None],
    };
    for t in territories {
        for c in &codesets {
            let mut dir = language.to_string();
            if let Some(t) = t {
                dir = format!("{dir}_{t}");
            }
            if let Some(c) = c {
                dir = format!("{dir}.{c}");
            }
            if let Some(m) = modifier {
                dir = format!("{dir}@{m}");
            }
            let path = format!("/usr/lib/locale/{dir}/{category}");
            if component(&dir) && !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

/// The file `tzset` reads for the time zone `tz` (the `TZ` variable; `None` when it is
/// unset): `/etc/localtime` by default, a path after a `:`, or a name under
/// `/usr/share/zoneinfo`. An empty `TZ` is UTC, read from no file.
pub fn time_zone_file(tz: Option<&str>) -> Option<String> {
    let Some(tz) = tz else {
        return Some("/etc/localtime".into());
    };
    let tz = tz.strip_prefix(':').unwrap_or(tz);
    if tz.is_empty() || tz.len() > MAX_NAME || tz.contains('\0') {
        return None;
    }
    if tz.starts_with('/') {
        return Some(tz.to_string());
    }
    // glibc refuses a relative name with `..` in it.
    if tz.split('/').any(|p| !component(p)) {
        return None;
    }
    Some(format!("/usr/share/zoneinfo/{tz}"))
}

/// Where glibc's character set conversions' cache (`gconv-modules.cache`) may be in an
/// image whose libraries are in `lib_dirs` (its `$libdir/gconv`), in the loader's
/// search order ([`crate::elf::search_paths`]).
pub fn conversions_cache(lib_dirs: &[String]) -> Vec<String> {
    lib_dirs
        .iter()
        .map(|d| format!("{}/gconv/gconv-modules.cache", d.trim_end_matches('/')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn glibcs_loaders_and_not_musls() {
        for l in [
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/ld-linux-aarch64.so.1",
            "/lib/ld-linux.so.2",
            "/lib/ld-linux-armhf.so.3",
            "/lib64/ld64.so.2",
            "/lib/ld64.so.1",
        ] {
            assert!(is_loader(l), "{l}");
        }
        for l in ["/lib/ld-musl-x86_64.so.1", "/system/bin/linker64", ""] {
            assert!(!is_loader(l), "{l}");
        }
    }

    #[test]
    fn a_locales_files_in_glibcs_order() {
        assert_eq!(
            locale_files("en_US.UTF-8", "LC_CTYPE"),
            [
                "/usr/lib/locale/locale-archive",
                "/usr/share/locale/locale.alias",
                "/usr/lib/locale/en_US.UTF-8/LC_CTYPE",
                "/usr/lib/locale/en_US.utf8/LC_CTYPE",
                "/usr/lib/locale/en_US/LC_CTYPE",
                "/usr/lib/locale/en.UTF-8/LC_CTYPE",
                "/usr/lib/locale/en.utf8/LC_CTYPE",
                "/usr/lib/locale/en/LC_CTYPE",
            ]
        );
        assert_eq!(
            locale_files("C.utf8", "LC_CTYPE")[2..],
            [
                "/usr/lib/locale/C.utf8/LC_CTYPE",
                "/usr/lib/locale/C/LC_CTYPE"
            ]
        );
        assert_eq!(
            locale_files("de_DE.8859-1@euro", "LC_CTYPE")[2..4],
            [
                "/usr/lib/locale/de_DE.8859-1@euro/LC_CTYPE",
                "/usr/lib/locale/de_DE.iso88591@euro/LC_CTYPE"
            ]
        );
        // Built in, or a name that would leave the directory: nothing.
        for n in ["C", "POSIX", "", "../../etc", "a/b", ".."] {
            assert!(locale_files(n, "LC_CTYPE").is_empty(), "{n}");
        }
    }

    #[test]
    fn the_time_zones_file() {
        assert_eq!(time_zone_file(None).unwrap(), "/etc/localtime");
        assert_eq!(
            time_zone_file(Some("Europe/Paris")).unwrap(),
            "/usr/share/zoneinfo/Europe/Paris"
        );
        assert_eq!(time_zone_file(Some(":/etc/tz")).unwrap(), "/etc/tz");
        for tz in ["", ":", "../etc/shadow", "a/../../b", "x\0y"] {
            assert_eq!(time_zone_file(Some(tz)), None, "{tz}");
        }
    }

    #[test]
    fn the_conversions_cache_is_beside_the_libraries() {
        assert_eq!(
            conversions_cache(&["/usr/lib/x86_64-linux-gnu/".into(), "/usr/lib64".into()]),
            [
                "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
                "/usr/lib64/gconv/gconv-modules.cache"
            ]
        );
    }

    proptest! {
        /// Names from the environment are untrusted: no panic, and every path stays in
        /// its directory.
        #[test]
        fn any_name_gives_paths_inside_their_directories(name in ".{0,300}") {
            for p in locale_files(&name, "LC_CTYPE") {
                prop_assert!(p.starts_with("/usr/lib/locale/") || p.starts_with("/usr/share/locale/"));
                prop_assert!(!p.split('/').any(|c| c == ".."));
            }
            if let Some(p) = time_zone_file(Some(&name)) {
                prop_assert!(p.starts_with('/'));
                if !name.starts_with('/') && !name.starts_with(":/") {
                    prop_assert!(p.starts_with("/usr/share/zoneinfo/"));
                    prop_assert!(!p.split('/').any(|c| c == ".."));
                }
            }
        }
    }
}
