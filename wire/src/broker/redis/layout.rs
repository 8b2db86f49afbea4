//! kombu's key layout for priorities on Redis (spec §9): which list a message of a given priority lives
//! in, and the order BRPOP serves those lists. Producers, consumers and Flower must agree on it, so it is
//! computed in this one place from the transport options.

use serde_json::Value;

use super::RedisTransportOptions;

/// Which priority bucket BRPOP serves first (`broker_transport_options.priority_order`: `kombu` or
/// `dagster`; the one type from the worker's configuration down to BRPOP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityOrder {
    /// kombu's order: `q, q\x06\x163, q\x06\x166, q\x06\x169` (lower number = higher priority on Redis).
    #[default]
    Kombu,
    /// Reverse: `q\x06\x169` first, so a higher Dagster priority runs first as on RabbitMQ.
    Dagster,
}

impl std::str::FromStr for PriorityOrder {
    type Err = String;
    /// `kombu` or `dagster`, as written in `broker_transport_options.priority_order`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kombu" => Ok(PriorityOrder::Kombu),
            "dagster" => Ok(PriorityOrder::Dagster),
            other => Err(format!(
                "priority order must be kombu or dagster, got {other:?}"
            )),
        }
    }
}

/// `properties.priority` as kombu reads it (`int(...)`, missing/invalid → 0), clamped to 0..=9.
pub(super) fn priority_of(v: Option<&Value>) -> u8 {
    let p = match v {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.trunc() as i64))
            .unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse::<i64>().unwrap_or(0),
        _ => 0,
    };
    // Lossless: clamped to 0..=9 first.
    p.clamp(0, 9) as u8
}

impl RedisTransportOptions {
    /// The list a message of `priority` lives in: `q` for step 0, else `q<sep><step>`.
    pub fn list_for(&self, queue: &str, priority: u8) -> String {
        let p = priority.min(9);
        let step = self
            .priority_steps
            .iter()
            .copied()
            .filter(|s| *s <= p)
            .max()
            .unwrap_or(0);
        if step == 0 {
            queue.to_string()
        } else {
            format!("{queue}{}{step}", self.sep)
        }
    }

    /// BRPOP key order for `queue` ([`PriorityOrder`]).
    pub fn brpop_keys(&self, queue: &str) -> Vec<String> {
        let mut steps = self.priority_steps.clone();
        steps.sort_unstable();
        steps.dedup();
        if self.priority_order == PriorityOrder::Dagster {
            steps.reverse();
        }
        let mut keys: Vec<String> = Vec::with_capacity(steps.len());
        for key in steps.into_iter().map(|s| self.list_for(queue, s)) {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// Every list of `queue` with the lowest priority step it holds, in ascending step order
    /// (`[(0, "q"), (3, "q\x06\x163"), …]`): what a queue's depth is summed over.
    pub fn priority_lists(&self, queue: &str) -> Vec<(u8, String)> {
        let mut steps = self.priority_steps.clone();
        steps.sort_unstable();
        steps.dedup();
        let mut lists: Vec<(u8, String)> = Vec::with_capacity(steps.len());
        for step in steps {
            let list = self.list_for(queue, step);
            if !lists.iter().any(|(_, l)| *l == list) {
                lists.push((step, list));
            }
        }
        lists
    }

    /// A member of `_kombu.binding.<exchange>`: `<routing key><sep><pattern><sep><queue>`, with the
    /// empty pattern of direct exchanges.
    pub(super) fn binding_member(&self, routing_key: &str, queue: &str) -> String {
        let sep = &self.sep;
        format!("{routing_key}{sep}{sep}{queue}")
    }

    /// The queue of a binding member whose routing key is `routing_key`, if it is one.
    pub(super) fn bound_queue<'m>(&self, member: &'m str, routing_key: &str) -> Option<&'m str> {
        let mut parts = member.splitn(3, self.sep.as_str());
        match (parts.next(), parts.next(), parts.next()) {
            (Some(rk), Some(_pattern), Some(queue)) if rk == routing_key => Some(queue),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn priority_parsing_like_kombu() {
        assert_eq!(priority_of(None), 0);
        assert_eq!(priority_of(Some(&json!(-3))), 0);
        assert_eq!(priority_of(Some(&json!(12))), 9);
        assert_eq!(priority_of(Some(&json!(4.7))), 4);
        assert_eq!(priority_of(Some(&json!("6"))), 6);
        assert_eq!(priority_of(Some(&json!("x"))), 0);
    }

    #[test]
    fn lists_and_bindings_in_kombus_layout() {
        let kombu = RedisTransportOptions::default();
        assert_eq!(kombu.list_for("q", 0), "q");
        assert_eq!(kombu.list_for("q", 5), "q\x06\x163");
        assert_eq!(kombu.list_for("q", 42), "q\x06\x169");
        assert_eq!(
            kombu.brpop_keys("q"),
            ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
        );
        let dagster = RedisTransportOptions {
            priority_order: "dagster".parse().unwrap(),
            ..Default::default()
        };
        assert_eq!(dagster.brpop_keys("q")[0], "q\x06\x169");
        assert_eq!(
            kombu.priority_lists("q"),
            [
                (0, "q".to_string()),
                (3, "q\x06\x163".into()),
                (6, "q\x06\x166".into()),
                (9, "q\x06\x169".into())
            ]
        );
        let member = kombu.binding_member("rk", "q");
        assert_eq!(member, "rk\x06\x16\x06\x16q");
        assert_eq!(kombu.bound_queue(&member, "rk"), Some("q"));
        assert_eq!(kombu.bound_queue(&member, "other"), None);
        assert!("fifo".parse::<PriorityOrder>().is_err());
    }
}
