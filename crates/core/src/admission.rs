//! Admission: what becomes of a request once its pool and priority are known. It is served,
//! shed (429), or held in flow control's queue; a pure decision over what the caller observed
//! (the request's priority, whether it comes out of the queue, the queue's state), which the
//! server acts on.
//!
//! Whether the pool has room is not an input: the pick itself finds out
//! ([`crate::schedule::pick`] lands in the saturated tier, or every endpoint is at its in-flight
//! cap), under the policy of each cluster, with the policy's `sheddable_capacity` share for a
//! sheddable request, and atomically with taking the in-flight count. So admission answers in
//! two steps: before the pick, [`admit`] says whether to pick at all and how to look at the
//! pool; after a pick that found no room, [`PickMode::IfRoom`] says what to do instead.
//!
//! The rules:
//! - a request with a priority below 0 is sheddable: while its pool has no room for it, it is
//!   refused;
//! - with flow control, the others wait in the queue while the pool has no room, and whenever
//!   others are waiting already (queued, or released and not picked yet), so that nobody
//!   overtakes them; a sheddable request is shed then (the pool was saturated when they queued,
//!   and is not free for it yet);
//! - a request released from the queue goes now: it is not queued again;
//! - without flow control, a request that is not sheddable is served whatever the saturation
//!   (a `kv-cache` pool serves past its thresholds; an `in-flight` pool refuses at its caps).

/// A request, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The priority of its InferenceObjective (0 when it has none).
    pub priority: i32,
    /// It comes out of flow control's queue, released to be picked now.
    pub released: bool,
}

impl Ask {
    /// Below 0: shed while its pool has no room for it.
    pub fn sheddable(self) -> bool {
        self.priority < 0
    }
}

/// The request's pool's flow control, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Flow control is off for the pool (it has no queue).
    Off,
    /// On, and nobody waits.
    Idle,
    /// On, and requests wait: queued, or released and not picked yet.
    Waiting,
}

/// What to do with a request before its pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Pick now, as `PickMode` says.
    Pick(PickMode),
    /// Hold it in the pool's queue (429 when its band is full).
    Queue,
    /// Refuse it: 429.
    Shed,
}

/// How to pick an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickMode {
    /// Serve it whatever the pool's saturation.
    Serve,
    /// Serve it only if the pool has room for it, seen with the policy's `sheddable_capacity`
    /// share of each endpoint's capacity when `sheddable`; when it has none, `otherwise`.
    IfRoom { sheddable: bool, otherwise: NoRoom },
}

/// What becomes of a request the pool has no room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    Queue,
    Shed,
}

/// Admission's decision for `ask` in a pool whose flow control is `flow`.
pub fn admit(ask: Ask, flow: Flow) -> Admission {
    // A released request does not queue again.
    let flow = if ask.released { Flow::Off } else { flow };
    match (ask.sheddable(), flow) {
        (true, Flow::Waiting) => Admission::Shed,
        (true, Flow::Off | Flow::Idle) => Admission::Pick(PickMode::IfRoom {
            sheddable: true,
            otherwise: NoRoom::Shed,
        }),
        (false, Flow::Waiting) => Admission::Queue,
        (false, Flow::Idle) => Admission::Pick(PickMode::IfRoom {
            sheddable: false,
            otherwise: NoRoom::Queue,
        }),
        (false, Flow::Off) => Admission::Pick(PickMode::Serve),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a request ends up, once the pick has said whether the pool had `room`.
    fn outcome(ask: Ask, flow: Flow, room: bool) -> &'static str {
        match admit(ask, flow) {
            Admission::Queue => "queue",
            Admission::Shed => "shed",
            Admission::Pick(PickMode::Serve) => "serve",
            Admission::Pick(PickMode::IfRoom { .. }) if room => "serve",
            Admission::Pick(PickMode::IfRoom { otherwise, .. }) => match otherwise {
                NoRoom::Queue => "queue",
                NoRoom::Shed => "shed",
            },
        }
    }

    const fn ask(priority: i32, released: bool) -> Ask {
        Ask { priority, released }
    }

    #[test]
    fn the_whole_table() {
        use Flow::*;
        // (priority, released, flow, room) -> outcome
        let table = [
            // Without flow control: sheddable requests go while there is room for them.
            (-1, false, Off, true, "serve"),
            (-1, false, Off, false, "shed"),
            // The others are served whatever the saturation.
            (0, false, Off, true, "serve"),
            (0, false, Off, false, "serve"),
            (5, false, Off, false, "serve"),
            // Flow control, nobody waiting: the others wait only when there is no room.
            (0, false, Idle, true, "serve"),
            (0, false, Idle, false, "queue"),
            (7, false, Idle, false, "queue"),
            (-1, false, Idle, true, "serve"),
            (-1, false, Idle, false, "shed"),
            // Others waiting: nobody overtakes them, whatever the room; sheddable ones go.
            (0, false, Waiting, true, "queue"),
            (0, false, Waiting, false, "queue"),
            (-1, false, Waiting, true, "shed"),
            (-1, false, Waiting, false, "shed"),
            // Released: picked now, never queued again, even behind others.
            (0, true, Waiting, false, "serve"),
            (0, true, Idle, false, "serve"),
            (0, true, Off, true, "serve"),
            // (A sheddable request is never queued; were one released, it would still see
            // only its share.)
            (-1, true, Waiting, true, "serve"),
            (-1, true, Waiting, false, "shed"),
        ];
        for (priority, released, flow, room, want) in table {
            assert_eq!(
                outcome(ask(priority, released), flow, room),
                want,
                "priority {priority}, released {released}, {flow:?}, room {room}"
            );
        }
    }

    #[test]
    fn only_sheddable_requests_look_with_the_sheddable_share() {
        for flow in [Flow::Off, Flow::Idle] {
            for (priority, sheddable) in [(-3, true), (-1, true), (0, false), (2, false)] {
                match admit(ask(priority, false), flow) {
                    Admission::Pick(PickMode::IfRoom { sheddable: s, .. }) => {
                        assert_eq!(s, sheddable, "{priority} {flow:?}")
                    }
                    Admission::Pick(PickMode::Serve) => {
                        assert!(!sheddable && flow == Flow::Off, "{priority} {flow:?}")
                    }
                    other => panic!("{priority} {flow:?}: {other:?}"),
                }
            }
        }
    }
}
