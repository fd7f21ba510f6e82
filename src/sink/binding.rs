//! The CloudEvents protocol bindings' header names and values, shared by the NATS
//! (`ce-`) and Kafka (`ce_`) sinks.

use std::borrow::Cow;

/// The attributes and extensions outboxd writes on every event, and their header names
/// in the NATS (`ce-`) and Kafka (`ce_`) bindings: static, so the hot path allocates no
/// header name for them.
const HEADER_NAMES: [(&str, &str, &str); 11] = [
    ("id", "ce-id", "ce_id"),
    ("source", "ce-source", "ce_source"),
    ("specversion", "ce-specversion", "ce_specversion"),
    ("type", "ce-type", "ce_type"),
    ("subject", "ce-subject", "ce_subject"),
    ("time", "ce-time", "ce_time"),
    ("dataschema", "ce-dataschema", "ce_dataschema"),
    ("correlationid", "ce-correlationid", "ce_correlationid"),
    ("causationid", "ce-causationid", "ce_causationid"),
    ("partitionkey", "ce-partitionkey", "ce_partitionkey"),
    ("sequence", "ce-sequence", "ce_sequence"),
];

/// The header names of [`HEADER_NAMES`] for `separator` (see [`ce_header_name`]).
pub fn ce_header_names(separator: char) -> impl Iterator<Item = &'static str> {
    HEADER_NAMES
        .iter()
        .map(move |(_, dash, underscore)| if separator == '-' { *dash } else { *underscore })
}

/// The binding's header name of attribute `name`, `separator` being `-` (NATS, HTTP)
/// or `_` (Kafka).
pub fn ce_header_name(name: &str, separator: char) -> Cow<'static, str> {
    match HEADER_NAMES.iter().find(|(attr, _, _)| *attr == name) {
        Some((_, dash, _)) if separator == '-' => Cow::Borrowed(dash),
        Some((_, _, underscore)) if separator == '_' => Cow::Borrowed(underscore),
        _ => Cow::Owned(format!("ce{separator}{name}")),
    }
}

/// The canonical string of an attribute value, as the SDK's `Display` writes it, but
/// without the formatting machinery (and its allocation) for the string-valued ones,
/// which are all but `time` and `specversion` on outboxd's events.
pub fn attribute_text<'a>(value: &cloudevents::event::AttributeValue<'a>) -> Cow<'a, str> {
    use cloudevents::event::AttributeValue as A;
    match value {
        A::String(s) => Cow::Borrowed(s),
        A::URIRef(s) => Cow::Borrowed(s.as_str()),
        A::URI(u) => Cow::Borrowed(u.as_str()),
        other => Cow::Owned(other.to_string()),
    }
}

/// [`attribute_text`] of an extension value.
pub fn extension_text(value: &cloudevents::event::ExtensionValue) -> Cow<'_, str> {
    match value {
        cloudevents::event::ExtensionValue::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_follow_the_bindings() {
        assert_eq!(ce_header_name("id", '-'), "ce-id");
        assert_eq!(ce_header_name("sequence", '_'), "ce_sequence");
        assert_eq!(ce_header_name("traceparent", '-'), "ce-traceparent");
        assert_eq!(ce_header_name("traceparent", '_'), "ce_traceparent");
    }
}
