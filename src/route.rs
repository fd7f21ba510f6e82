//! Destination (subject, topic) and key templates.
//!
//! A template is parsed once at start-up; rendering per event only copies literal
//! text and the sanitised field values into one `String`. Sanitising is what keeps a
//! row value from changing the shape of a destination: a `.` inside an aggregate
//! type must not add a NATS subject token, a `*` or `>` must not become a wildcard.

use std::fmt;

/// A template error, found at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// `{name}` is not one of the known placeholders.
    #[error(
        "unknown placeholder {{{0}}}: use {{aggregate_type}}, {{aggregate_id}} or {{event_type}}"
    )]
    UnknownPlaceholder(String),
    /// A `{` without its `}`.
    #[error("unclosed '{{' in template")]
    Unclosed,
    /// Nothing to render.
    #[error("template is empty")]
    Empty,
}

/// The row fields a template can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `{aggregate_type}`
    AggregateType,
    /// `{aggregate_id}`
    AggregateId,
    /// `{event_type}`
    EventType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// How field values are made safe for the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sanitize {
    /// NATS subject token: no `.`, `*`, `>`, whitespace or control characters.
    NatsToken,
    /// Kafka topic name: only `[A-Za-z0-9._-]`.
    KafkaTopic,
    /// Values are used as they are (record keys).
    None,
}

/// A parsed template such as `outbox.{aggregate_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The values to render a template with.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// Aggregate type of the row.
    pub aggregate_type: &'a str,
    /// Aggregate id of the row.
    pub aggregate_id: &'a str,
    /// Event type of the row (without prefix).
    pub event_type: &'a str,
}

impl Template {
    /// Parses `text`; fails on unknown placeholders.
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        if text.is_empty() {
            return Err(RouteError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(RouteError::Unclosed)?;
            let field = match &after[..close] {
                "aggregate_type" => Field::AggregateType,
                "aggregate_id" => Field::AggregateId,
                "event_type" => Field::EventType,
                other => return Err(RouteError::UnknownPlaceholder(other.to_string())),
            };
            parts.push(Part::Field(field));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// The literal text before the first placeholder; all of it for a template
    /// without placeholders.
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(s)) => s,
            _ => "",
        }
    }

    /// True when the template has no placeholders (it always renders the same).
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// True when `field` occurs in the template.
    pub fn uses(&self, field: Field) -> bool {
        self.parts.contains(&Part::Field(field))
    }

    /// Renders the template, sanitising every field value.
    pub fn render(&self, fields: &Fields<'_>, how: Sanitize) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(f) => {
                    let v = match f {
                        Field::AggregateType => fields.aggregate_type,
                        Field::AggregateId => fields.aggregate_id,
                        Field::EventType => fields.event_type,
                    };
                    push_sanitized(&mut out, v, how);
                }
            }
        }
        out
    }
}

fn push_sanitized(out: &mut String, v: &str, how: Sanitize) {
    if v.is_empty() && how != Sanitize::None {
        // An empty token would make an invalid subject (`a..b`) or topic.
        out.push('_');
        return;
    }
    match how {
        Sanitize::None => out.push_str(v),
        Sanitize::NatsToken => out.extend(v.chars().map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })),
        Sanitize::KafkaTopic => out.extend(v.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })),
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.parts {
            match p {
                Part::Literal(s) => f.write_str(s)?,
                Part::Field(Field::AggregateType) => f.write_str("{aggregate_type}")?,
                Part::Field(Field::AggregateId) => f.write_str("{aggregate_id}")?,
                Part::Field(Field::EventType) => f.write_str("{event_type}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Fields<'static> = Fields {
        aggregate_type: "Order",
        aggregate_id: "o-1",
        event_type: "OrderCreated",
    };

    #[test]
    fn renders_all_placeholders() {
        let t = Template::parse("x.{aggregate_type}.{event_type}.{aggregate_id}").expect("valid");
        assert_eq!(
            t.render(&F, Sanitize::NatsToken),
            "x.Order.OrderCreated.o-1"
        );
        assert_eq!(
            t.to_string(),
            "x.{aggregate_type}.{event_type}.{aggregate_id}"
        );
    }

    #[test]
    fn nats_values_cannot_add_tokens_or_wildcards() {
        let t = Template::parse("outbox.{aggregate_type}").expect("valid");
        let f = Fields {
            aggregate_type: "a.b *>\tc",
            ..F
        };
        assert_eq!(t.render(&f, Sanitize::NatsToken), "outbox.a_b____c");
        let f = Fields {
            aggregate_type: "",
            ..F
        };
        assert_eq!(t.render(&f, Sanitize::NatsToken), "outbox._");
    }

    #[test]
    fn kafka_topics_keep_only_legal_characters() {
        let t = Template::parse("outbox.event.{aggregate_type}").expect("valid");
        let f = Fields {
            aggregate_type: "Ordér/x y",
            ..F
        };
        assert_eq!(t.render(&f, Sanitize::KafkaTopic), "outbox.event.Ord_r_x_y");
    }

    #[test]
    fn keys_are_verbatim() {
        let t = Template::parse("{aggregate_id}").expect("valid");
        let f = Fields {
            aggregate_id: "a.b c",
            ..F
        };
        assert_eq!(t.render(&f, Sanitize::None), "a.b c");
    }

    #[test]
    fn prefix_and_fields_are_known() {
        let t = Template::parse("outbox.event.{aggregate_type}").expect("valid");
        assert_eq!(t.literal_prefix(), "outbox.event.");
        assert!(!t.is_literal());
        assert!(t.uses(Field::AggregateType) && !t.uses(Field::AggregateId));
        let t = Template::parse("orders").expect("valid");
        assert_eq!((t.literal_prefix(), t.is_literal()), ("orders", true));
        let t = Template::parse("{event_type}.x").expect("valid");
        assert_eq!(t.literal_prefix(), "");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(
            Template::parse("a.{nope}"),
            Err(RouteError::UnknownPlaceholder("nope".into()))
        );
        assert_eq!(
            Template::parse("a.{aggregate_type"),
            Err(RouteError::Unclosed)
        );
        assert_eq!(Template::parse(""), Err(RouteError::Empty));
    }
}
