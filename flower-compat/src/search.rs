//! The `search` parameter of `/api/tasks` (Flower 2.2 `flower/utils/search.py`): terms separated by
//! spaces (implicit AND), `AND`, `OR`, parentheses (5 levels), `"quoted phrases"`, field qualifiers
//! `name: state: worker: args: kwargs: result:`; `state:` is exact, `kwargs:key=value` matches one
//! keyword argument; other terms are case-insensitive substrings of at least 3 characters.

use crate::task::Task;

const SEARCH_FIELDS: [&str; 6] = ["name", "state", "worker", "args", "kwargs", "result"];
const MIN_SUBSTRING_LENGTH: usize = 3;
const MAX_QUERY_LENGTH: usize = 2048;
const MAX_QUERY_TOKENS: usize = 128;
const MAX_QUERY_DEPTH: usize = 5;

/// A query Flower would reject with 400 and `{"error": "<message>"}`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct QueryError(pub String);

fn err(message: &str, position: Option<usize>) -> QueryError {
    match position {
        Some(p) => QueryError(format!("{message} at position {p}.")),
        None => QueryError(format!("{message}.")),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    All,
    Term {
        field: Option<String>,
        value: String,
    },
    And(Vec<Query>),
    Or(Vec<Query>),
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    LParen,
    RParen,
    And,
    Or,
    Term,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    value: String,
    position: usize,
}

fn tokenize(q: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = q.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let push = |tokens: &mut Vec<Token>, kind, value: String, position| {
        tokens.push(Token {
            kind,
            value,
            position,
        });
        if tokens.len() > MAX_QUERY_TOKENS {
            return Err(err(
                &format!("Query exceeds {MAX_QUERY_TOKENS} tokens"),
                None,
            ));
        }
        Ok(())
    };
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let position = i;
        if chars[i] == '(' {
            push(&mut tokens, Kind::LParen, "(".into(), position)?;
            i += 1;
            continue;
        }
        if chars[i] == ')' {
            push(&mut tokens, Kind::RParen, ")".into(), position)?;
            i += 1;
            continue;
        }
        let mut value = String::new();
        let (mut quoted, mut in_quote) = (false, false);
        while i < chars.len() {
            let c = chars[i];
            if c == '\\' && i + 1 < chars.len() && matches!(chars[i + 1], '"' | '\\') {
                value.push(chars[i + 1]);
                i += 2;
                continue;
            }
            if c == '"' {
                quoted = true;
                in_quote = !in_quote;
                i += 1;
                continue;
            }
            if !in_quote && (c.is_whitespace() || c == '(' || c == ')') {
                break;
            }
            value.push(c);
            i += 1;
        }
        if in_quote {
            return Err(err("Unterminated quoted phrase", Some(position)));
        }
        if value.is_empty() {
            return Err(err("Empty search term", Some(position)));
        }
        let kind = match value.as_str() {
            "AND" if !quoted => Kind::And,
            "OR" if !quoted => Kind::Or,
            "NOT" if !quoted => return Err(err("NOT is not supported", Some(position))),
            _ => Kind::Term,
        };
        push(&mut tokens, kind, value, position)?;
    }
    tokens.push(Token {
        kind: Kind::Eof,
        value: String::new(),
        position: chars.len(),
    });
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    index: usize,
}

impl Parser {
    fn current(&self) -> &Token {
        &self.tokens[self.index.min(self.tokens.len() - 1)]
    }

    fn advance(&mut self) -> Token {
        let t = self.current().clone();
        self.index += 1;
        t
    }

    fn parse(&mut self) -> Result<Query, QueryError> {
        if self.current().kind == Kind::Eof {
            return Ok(Query::All);
        }
        let e = self.parse_or(0)?;
        if self.current().kind != Kind::Eof {
            let t = self.current();
            return Err(err(&format!("Unexpected '{}'", t.value), Some(t.position)));
        }
        Ok(e)
    }

    fn parse_or(&mut self, depth: usize) -> Result<Query, QueryError> {
        let mut children = vec![self.parse_and(depth)?];
        while self.current().kind == Kind::Or {
            let op = self.advance();
            if matches!(
                self.current().kind,
                Kind::Eof | Kind::RParen | Kind::And | Kind::Or
            ) {
                return Err(err(
                    "OR must be followed by a search term",
                    Some(op.position),
                ));
            }
            children.push(self.parse_and(depth)?);
        }
        Ok(combine(children, false))
    }

    fn parse_and(&mut self, depth: usize) -> Result<Query, QueryError> {
        let mut children = vec![self.parse_primary(depth)?];
        while !matches!(self.current().kind, Kind::Eof | Kind::RParen | Kind::Or) {
            if self.current().kind == Kind::And {
                let op = self.advance();
                if matches!(
                    self.current().kind,
                    Kind::Eof | Kind::RParen | Kind::And | Kind::Or
                ) {
                    return Err(err(
                        "AND must be followed by a search term",
                        Some(op.position),
                    ));
                }
            }
            children.push(self.parse_primary(depth)?);
        }
        Ok(combine(children, true))
    }

    fn parse_primary(&mut self, depth: usize) -> Result<Query, QueryError> {
        let token = self.current().clone();
        if token.kind == Kind::LParen {
            if depth >= MAX_QUERY_DEPTH {
                return Err(err(
                    &format!("Query nesting exceeds {MAX_QUERY_DEPTH} levels"),
                    Some(token.position),
                ));
            }
            self.advance();
            if self.current().kind == Kind::RParen {
                return Err(err("Empty group", Some(token.position)));
            }
            let e = self.parse_or(depth + 1)?;
            if self.current().kind != Kind::RParen {
                return Err(err("Missing closing parenthesis", Some(token.position)));
            }
            self.advance();
            return Ok(e);
        }
        if token.kind != Kind::Term {
            return Err(err("Expected a search term", Some(token.position)));
        }
        self.advance();
        parse_term(&token)
    }
}

fn combine(children: Vec<Query>, and: bool) -> Query {
    let mut flat: Vec<Query> = Vec::new();
    for c in children {
        let items = match c {
            Query::And(v) if and => v,
            Query::Or(v) if !and => v,
            other => vec![other],
        };
        for i in items {
            if !flat.contains(&i) {
                flat.push(i);
            }
        }
    }
    if flat.len() == 1 {
        return flat.remove(0);
    }
    if and {
        Query::And(flat)
    } else {
        Query::Or(flat)
    }
}

fn parse_term(token: &Token) -> Result<Query, QueryError> {
    let mut field = None;
    let mut value = token.value.clone();
    if let Some((candidate, rest)) = token.value.split_once(':') {
        let c = candidate.to_lowercase();
        if SEARCH_FIELDS.contains(&c.as_str()) {
            field = Some(c);
            value = rest.to_string();
        }
    }
    if field.is_none() && value.starts_with('-') {
        return Err(err(
            "Negation with '-' is not supported",
            Some(token.position),
        ));
    }
    if value.is_empty() {
        return Err(err(
            "Search qualifier requires a value",
            Some(token.position),
        ));
    }
    let exact = field.as_deref() == Some("state")
        || (field.as_deref() == Some("kwargs") && value.contains('='));
    if !exact && value.trim().chars().count() < MIN_SUBSTRING_LENGTH {
        return Err(err(
            &format!(
                "Substring search terms must contain at least {MIN_SUBSTRING_LENGTH} characters"
            ),
            Some(token.position),
        ));
    }
    Ok(Query::Term {
        field,
        value: value.to_lowercase(),
    })
}

/// Parses a `search` value (empty → everything).
pub fn parse(raw: &str) -> Result<Query, QueryError> {
    let q = raw.trim();
    if q.chars().count() > MAX_QUERY_LENGTH {
        return Err(err(
            &format!("Query exceeds {MAX_QUERY_LENGTH} characters"),
            None,
        ));
    }
    Parser {
        tokens: tokenize(q)?,
        index: 0,
    }
    .parse()
}

fn text(v: &Option<serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.to_lowercase(),
        Some(other) => other.to_string().to_lowercase(),
    }
}

/// `key=value` pairs of a kwargs repr such as `{'a': 1, 'b': 'x'}` (top level only), case-folded.
fn kwargs_pairs(kwargs: &str) -> Vec<String> {
    let t = kwargs.trim();
    let inner = t.strip_prefix('{').unwrap_or(t);
    let inner = inner.strip_suffix('}').unwrap_or(inner);
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0;
    let bytes: Vec<char> = inner.chars().collect();
    let mut items = Vec::new();
    for (i, c) in bytes.iter().enumerate() {
        match quote {
            Some(q) if *c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' => quote = Some(*c),
                '{' | '[' | '(' => depth += 1,
                '}' | ']' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(bytes[start..i].iter().collect::<String>());
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    items.push(bytes[start..].iter().collect::<String>());
    for item in items {
        if let Some((k, v)) = item.split_once(':') {
            let unq = |s: &str| {
                s.trim()
                    .trim_matches(|c| c == '\'' || c == '"')
                    .to_lowercase()
            };
            out.push(format!("{}={}", unq(k), unq(v)));
        }
    }
    out
}

/// `needle` (already lower-case) in `hay`, ignoring case, without allocating for ASCII needles.
pub fn contains_ci(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    if !needle.is_ascii() {
        return hay.to_lowercase().contains(needle);
    }
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.len() > h.len() {
        return false;
    }
    let first = n[0];
    h.windows(n.len())
        .any(|w| w[0].to_ascii_lowercase() == first && w.eq_ignore_ascii_case(n))
}

/// `a` equals `b_lower` (already lower-case), ignoring case.
pub fn eq_ci(a: &str, b_lower: &str) -> bool {
    if a.is_ascii() && b_lower.is_ascii() {
        a.eq_ignore_ascii_case(b_lower)
    } else {
        a.to_lowercase() == b_lower
    }
}

fn value_contains(v: &Option<serde_json::Value>, needle: &str) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::String(s)) => contains_ci(s, needle),
        Some(other) => contains_ci(&other.to_string(), needle),
    }
}

impl Query {
    pub fn matches(&self, t: &Task) -> bool {
        match self {
            Query::All => true,
            Query::And(v) => v.iter().all(|q| q.matches(t)),
            Query::Or(v) => v.iter().any(|q| q.matches(t)),
            Query::Term { field, value } => {
                let name = t.name.as_deref().unwrap_or("");
                let worker = t.worker.as_deref().unwrap_or("");
                let v = value.as_str();
                match field.as_deref() {
                    Some("state") => eq_ci(&t.state, v),
                    Some("kwargs") if value.contains('=') => {
                        let (k, val) = value.split_once('=').unwrap_or((value, ""));
                        let want = format!("{}={}", k.trim(), val.trim());
                        kwargs_pairs(&text(&t.kwargs)).contains(&want)
                    }
                    Some("name") => contains_ci(name, v),
                    Some("worker") => contains_ci(worker, v),
                    Some("args") => value_contains(&t.args, v),
                    Some("kwargs") => value_contains(&t.kwargs, v),
                    Some("result") => value_contains(&t.result, v),
                    // Any field (a term cannot span fields: Flower joins them with NUL).
                    _ => {
                        contains_ci(&t.uuid, v)
                            || contains_ci(name, v)
                            || contains_ci(&t.state, v)
                            || contains_ci(worker, v)
                            || value_contains(&t.args, v)
                            || value_contains(&t.kwargs, v)
                            || value_contains(&t.result, v)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert_eq!(parse("").unwrap(), Query::All);
        assert!(matches!(parse("foo bar").unwrap(), Query::And(v) if v.len() == 2));
        assert!(matches!(
            parse("foo OR (bar AND baz)").unwrap(),
            Query::Or(_)
        ));
        assert_eq!(
            parse("ab").unwrap_err().0,
            "Substring search terms must contain at least 3 characters at position 0."
        );
        assert!(parse("NOT x").is_err());
        assert!(parse("\"open").is_err());
        assert!(parse("state:x").is_ok());
        assert!(contains_ci("Hello World", "o wor"));
        assert!(!contains_ci("Hello", "hello!"));
        assert!(eq_ci("SUCCESS", "success"));
    }

    #[test]
    fn kwargs_pairs_of_repr() {
        assert_eq!(
            kwargs_pairs("{'a': 1, 'b': 'X, y', 'c': {'d': 2}}"),
            vec!["a=1", "b=x, y", "c={'d': 2}"]
        );
    }
}
