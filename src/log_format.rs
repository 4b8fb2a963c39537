//! JSON log lines: one object per event, with typed fields.
//!
//! tracing-subscriber's own JSON format writes every value recorded with `?` as a
//! string, so a list of names becomes `"[\"a\", \"b\"]"` that a log pipeline cannot
//! query. This format writes numbers and booleans as such, and a value whose text is a
//! JSON array (a `Vec` of strings or numbers) as that array.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format: `{"timestamp","level","fields":{..},"target","span":{..}}`, the
/// same keys as tracing-subscriber's JSON, with typed values.
#[derive(Debug, Default)]
pub struct JsonLines;

/// How span fields are kept between events: as JSON object text, so that the event
/// format can merge them back as typed values.
#[derive(Debug, Default)]
pub struct JsonSpanFields;

/// Collects fields into a JSON object.
struct Collect<'a>(&'a mut Map<String, Value>);

impl Visit for Collect<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let number = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().to_string(), number);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        // `Debug` of a Vec of strings or numbers is valid JSON: keep it a list.
        let value = match text.starts_with('[') {
            true => match serde_json::from_str::<Value>(&text) {
                Ok(list @ Value::Array(_)) => list,
                _ => Value::String(text),
            },
            false => Value::String(text),
        };
        self.0.insert(field.name().to_string(), value);
    }
}

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut Collect(&mut map));
        write!(writer, "{}", Value::Object(map))
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut map = match serde_json::from_str::<Value>(&current.fields) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        fields.record(&mut Collect(&mut map));
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

impl<S> FormatEvent<S, JsonSpanFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonSpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = Map::new();
        event.record(&mut Collect(&mut fields));
        let mut line = Map::new();
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("fields".into(), Value::Object(fields));
        line.insert("target".into(), event.metadata().target().into());
        if let Some(span) = ctx.lookup_current() {
            let mut span_fields = span
                .extensions()
                .get::<FormattedFields<JsonSpanFields>>()
                .and_then(|f| serde_json::from_str::<Value>(&f.fields).ok())
                .and_then(|v| match v {
                    Value::Object(map) => Some(map),
                    _ => None,
                })
                .unwrap_or_default();
            span_fields.insert("name".into(), span.name().into());
            line.insert("span".into(), Value::Object(span_fields));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}
