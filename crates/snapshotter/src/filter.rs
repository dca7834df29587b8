//! containerd's filter expressions over snapshots, as `List` receives them:
//! `labels."containerd.io/snapshot.ref"==sha256:…,parent=="k8s.io/3/sha256:…"`.
//!
//! A request carries a list of filters, any of which may match; a filter is a list of
//! conditions joined by `,`, all of which must hold. A condition is a field (`name`,
//! `parent`, `kind`, `labels.KEY` or `labels."KEY"`), alone (it is present) or followed
//! by `==` or `!=` and a value, quoted or not. containerd's `~=` (a regular expression)
//! is refused rather than guessed at. Written here because containerd's filter grammar
//! exists only in Go; this covers what containerd and CRI send to a snapshotter.

use crate::store::{Kind, Snapshot};

/// The longest filter accepted, in bytes.
const MAX_FILTER: usize = 4096;

/// A parsed filter: every condition must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Condition>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    field: Field,
    test: Test,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
}

/// Why a filter does not parse.
#[derive(Debug, thiserror::Error)]
#[error("filter {filter:?}: {why}")]
pub struct FilterError {
    filter: String,
    why: String,
}

impl Filter {
    /// Parses one filter.
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        let err = |why: &str| FilterError {
            filter: s.chars().take(200).collect(),
            why: why.to_string(),
        };
        if s.len() > MAX_FILTER {
            return Err(err("longer than 4096 bytes"));
        }
        let mut p = Parser {
            s: s.as_bytes(),
            at: 0,
        };
        let mut conds = Vec::new();
        loop {
            p.skip_spaces();
            if p.at == p.s.len() {
                break;
            }
            let field = p.field().map_err(|w| err(&w))?;
            p.skip_spaces();
            let test = if p.eat("==") {
                Test::Equal(p.value().map_err(|w| err(&w))?)
            } else if p.eat("!=") {
                Test::NotEqual(p.value().map_err(|w| err(&w))?)
            } else if p.eat("~=") {
                return Err(err("regular expressions (~=) are not supported"));
            } else {
                Test::Present
            };
            conds.push(Condition { field, test });
            p.skip_spaces();
            if p.at == p.s.len() {
                break;
            }
            if !p.eat(",") {
                return Err(err(&format!("expected `,` at byte {}", p.at)));
            }
        }
        Ok(Filter(conds))
    }

    /// Whether snapshot `name` matches.
    pub fn matches(&self, name: &str, snap: &Snapshot) -> bool {
        self.0.iter().all(|c| {
            let value = match &c.field {
                Field::Name => Some(name),
                Field::Parent => snap.parent.as_deref(),
                Field::Kind => Some(match snap.kind {
                    Kind::View => "view",
                    Kind::Active => "active",
                    Kind::Committed => "committed",
                }),
                Field::Label(k) => snap.labels.get(k).map(String::as_str),
            };
            match &c.test {
                Test::Present => value.is_some_and(|v| !v.is_empty()),
                Test::Equal(want) => value.unwrap_or("") == want,
                Test::NotEqual(want) => value.unwrap_or("") != want,
            }
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_spaces(&mut self) {
        while self.s.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        if self.s[self.at..].starts_with(tok.as_bytes()) {
            self.at += tok.len();
            true
        } else {
            false
        }
    }

    fn field(&mut self) -> Result<Field, String> {
        let word = self.word(|b| b.is_ascii_alphanumeric() || b == b'_');
        match word.as_str() {
            "name" => Ok(Field::Name),
            "parent" => Ok(Field::Parent),
            "kind" => Ok(Field::Kind),
            "labels" => {
                if !self.eat(".") {
                    return Err("`labels` needs a key: labels.KEY".into());
                }
                let key = if self.s.get(self.at) == Some(&b'"') {
                    self.quoted()?
                } else {
                    self.word(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
                };
                if key.is_empty() {
                    return Err("an empty label key".into());
                }
                Ok(Field::Label(key))
            }
            "" => Err(format!("expected a field at byte {}", self.at)),
            other => Err(format!(
                "unknown field {other:?} (name, parent, kind, labels.KEY)"
            )),
        }
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_spaces();
        if self.s.get(self.at) == Some(&b'"') {
            self.quoted()
        } else {
            Ok(self.word(|b| b != b',' && !b.is_ascii_whitespace()))
        }
    }

    fn word(&mut self, ok: impl Fn(u8) -> bool) -> String {
        let start = self.at;
        while self.s.get(self.at).is_some_and(|&b| ok(b)) {
            self.at += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.at]).into_owned()
    }

    /// A double-quoted string with `\"` and `\\` escapes.
    fn quoted(&mut self) -> Result<String, String> {
        let start = self.at;
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.at) {
                None => return Err(format!("unterminated quote from byte {start}")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    let &c = self
                        .s
                        .get(self.at + 1)
                        .ok_or_else(|| format!("unterminated quote from byte {start}"))?;
                    out.push(c);
                    self.at += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Content, Time};
    use std::collections::BTreeMap;

    fn snap(parent: Option<&str>, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: 1,
            kind: Kind::Committed,
            parent: parent.map(String::from),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: Time::now(),
            updated: Time::now(),
            content: Content::Dir,
            usage: None,
        }
    }

    #[test]
    fn the_filter_containerd_sends_after_a_remote_prepare_matches_only_its_snapshot() {
        // As containerd 1.6's metadata store writes it (metadata/snapshot.go).
        let f = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="k8s.io/3/sha256:p""#,
        )
        .unwrap();
        let ref_label = [("containerd.io/snapshot.ref", "sha256:abc")];
        assert!(f.matches("sha256:abc", &snap(Some("k8s.io/3/sha256:p"), &ref_label)));
        assert!(!f.matches("sha256:abc", &snap(Some("k8s.io/3/sha256:q"), &ref_label)));
        assert!(!f.matches("x", &snap(Some("k8s.io/3/sha256:p"), &[])));
        // The first layer has no parent: containerd sends `parent==""`.
        let f =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#).unwrap();
        assert!(f.matches("n", &snap(None, &ref_label)));
    }

    #[test]
    fn fields_tests_and_errors() {
        let s = snap(None, &[("a.b/c", "1")]);
        for (f, want) in [
            ("", true),
            ("kind==committed", true),
            ("kind!=committed", false),
            ("name==n", true),
            ("labels.a.b/c", true),
            ("labels.\"a.b/c\"==1", true),
            ("labels.x", false),
            (" name == \"n\" , kind==committed ", true),
        ] {
            assert_eq!(Filter::parse(f).unwrap().matches("n", &s), want, "{f}");
        }
        for bad in [
            "size==1",
            "labels",
            "name==\"x",
            "name~=x",
            "name==a b",
            "labels.==1",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }
}
