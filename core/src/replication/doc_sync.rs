//! One document's Automerge sync session between two nodes, as a turn-taking machine.
//!
//! Both sides of a session speak the same protocol: the initiator sends first, then each side
//! answers the other's message with the document's next sync message (or an empty one when it
//! has nothing to say). A session is over after an exchange in which neither side had anything
//! to say. The ending is asymmetric because the initiator speaks first:
//!
//! - the responder, on receiving an empty message and having nothing to answer, still sends its
//!   empty answer (the initiator is waiting for it) and then ends;
//! - the initiator ends on receiving an empty answer to its own empty message, without sending.
//!
//! So a quiet session costs one empty message each way, and neither side waits on a message
//! that never comes. Automerge's sync protocol can loop when a message is lost; every session
//! runs on a reliable stream with a fresh sync state, and gives up after
//! [`DOC_SYNC_ROUNDS_MAX`] messages each way.
//!
//! The machine does no I/O and holds no document: the driver feeds it the peer's messages and
//! the document's own sync messages, and does what it returns.

use automerge::sync::{Message, ReadMessageError};

use crate::limits::DOC_SYNC_ROUNDS_MAX;

/// Which side of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the stream and speaks first.
    Initiator,
    /// Answers a session the peer opened.
    Responder,
}

/// Why a session cannot go on. Every kind ends the session; none affects other documents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocSyncError {
    /// The peer's sync message does not decode.
    #[error("malformed sync message: {0}")]
    Malformed(#[from] ReadMessageError),
    /// The session went on past [`DOC_SYNC_ROUNDS_MAX`] messages each way: the two documents
    /// are not converging on this stream (anti-entropy tries again in its next round).
    #[error("the sync session took more than {DOC_SYNC_ROUNDS_MAX} rounds")]
    TooManyRounds,
    /// The driver called the machine out of turn (a bug in the driver, not the peer).
    #[error("sync session step out of turn: expected {expected}")]
    OutOfTurn {
        /// What the machine was waiting for.
        expected: &'static str,
    },
}

/// What to do with a message the peer sent.
#[derive(Debug)]
pub enum Received {
    /// Run the document's sync step on this message (none: the peer had nothing to say, but
    /// this side may still have), then pass its output to [`DocSync::send`].
    Apply(Option<Message>),
    /// The session is over: nothing more is sent or read.
    Done,
}

/// What to put on the stream after the document's sync step.
#[derive(Debug)]
pub struct Outgoing {
    /// The encoded sync message; `None` is the empty message ("nothing to say").
    pub message: Option<Vec<u8>>,
    /// After sending this, finish the stream: the session is over.
    pub last: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Waiting for the document's next sync message, to send.
    Send,
    /// Waiting for the peer's message.
    Receive,
    /// Over.
    Done,
}

/// The turn-taking and termination of one document sync session (see the module docs).
#[derive(Debug)]
pub struct DocSync {
    role: Role,
    turn: Turn,
    /// Messages received so far.
    rounds: usize,
    /// The last message this side sent was empty.
    sent_nothing: bool,
    /// The last message the peer sent was empty.
    received_nothing: bool,
}

impl DocSync {
    /// A session this side opens: the driver runs the document's sync step with no incoming
    /// message and passes the result to [`DocSync::send`].
    pub fn initiator() -> Self {
        DocSync::new(Role::Initiator, Turn::Send)
    }

    /// A session the peer opened: the driver passes the peer's first message to
    /// [`DocSync::receive`].
    pub fn responder() -> Self {
        DocSync::new(Role::Responder, Turn::Receive)
    }

    fn new(role: Role, turn: Turn) -> Self {
        DocSync {
            role,
            turn,
            rounds: 0,
            sent_nothing: false,
            received_nothing: false,
        }
    }

    /// Which side this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Messages received from the peer so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// The session is over.
    pub fn is_done(&self) -> bool {
        self.turn == Turn::Done
    }

    /// Takes the peer's message (`None`: the empty message).
    pub fn receive(&mut self, message: Option<&[u8]>) -> Result<Received, DocSyncError> {
        if self.turn != Turn::Receive {
            return Err(DocSyncError::OutOfTurn {
                expected: self.expected(),
            });
        }
        self.received_nothing = message.is_none();
        if self.role == Role::Initiator && self.sent_nothing && self.received_nothing {
            self.turn = Turn::Done;
            return Ok(Received::Done);
        }
        self.rounds += 1;
        if self.rounds > DOC_SYNC_ROUNDS_MAX {
            self.turn = Turn::Done;
            return Err(DocSyncError::TooManyRounds);
        }
        let decoded = match message.map(Message::decode).transpose() {
            Ok(m) => m,
            Err(e) => {
                self.turn = Turn::Done;
                return Err(e.into());
            }
        };
        self.turn = Turn::Send;
        Ok(Received::Apply(decoded))
    }

    /// Takes the document's next sync message (`None`: nothing to say) and returns what to
    /// send.
    pub fn send(&mut self, message: Option<Message>) -> Result<Outgoing, DocSyncError> {
        if self.turn != Turn::Send {
            return Err(DocSyncError::OutOfTurn {
                expected: self.expected(),
            });
        }
        self.sent_nothing = message.is_none();
        let last = self.role == Role::Responder && self.received_nothing && self.sent_nothing;
        self.turn = if last { Turn::Done } else { Turn::Receive };
        Ok(Outgoing {
            message: message.map(Message::encode),
            last,
        })
    }

    fn expected(&self) -> &'static str {
        match self.turn {
            Turn::Send => "the document's next sync message",
            Turn::Receive => "the peer's message",
            Turn::Done => "nothing (the session is over)",
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::sync::{State, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT, ReadDoc};

    use super::*;

    fn doc_with(actor: u8, keys: &[&str]) -> AutoCommit {
        let mut doc = AutoCommit::new().with_actor(automerge::ActorId::from(vec![actor; 16]));
        for k in keys {
            doc.put(ROOT, *k, *k).expect("put");
        }
        doc.commit();
        doc
    }

    /// One side of a session over an in-memory channel: its document, sync state and machine.
    struct Side {
        doc: AutoCommit,
        state: State,
        machine: DocSync,
    }

    impl Side {
        fn new(doc: AutoCommit, machine: DocSync) -> Self {
            Side {
                doc,
                state: State::new(),
                machine,
            }
        }

        /// Runs the document's sync step on `incoming` and hands the result to the machine.
        fn answer(&mut self, incoming: Option<Message>) -> Outgoing {
            if let Some(m) = incoming {
                self.doc
                    .sync()
                    .receive_sync_message(&mut self.state, m)
                    .expect("a valid message applies");
            }
            let out = self.doc.sync().generate_sync_message(&mut self.state);
            self.machine.send(out).expect("in turn")
        }
    }

    /// Drives a whole session; `tamper` may replace each message on the wire. Returns the
    /// messages sent by (initiator, responder).
    fn run(
        a: &mut Side,
        b: &mut Side,
        mut tamper: impl FnMut(Option<Vec<u8>>) -> Option<Vec<u8>>,
    ) -> Result<(usize, usize), DocSyncError> {
        let (mut from_a, mut from_b) = (0, 0);
        let mut out = a.answer(None);
        loop {
            // Initiator → responder.
            from_a += 1;
            assert!(!out.last, "the initiator never finishes with a send");
            let msg = tamper(out.message);
            let Received::Apply(m) = b.machine.receive(msg.as_deref())? else {
                panic!("a responder is never done on receiving");
            };
            let reply = b.answer(m);
            from_b += 1;
            let reply_last = reply.last;
            let msg = tamper(reply.message);
            match a.machine.receive(msg.as_deref())? {
                Received::Done => {
                    assert!(
                        reply_last,
                        "the initiator ends only on the responder's last"
                    );
                    return Ok((from_a, from_b));
                }
                Received::Apply(m) => {
                    assert!(!reply_last, "the responder ended but the initiator goes on");
                    out = a.answer(m);
                }
            }
        }
    }

    fn keys(doc: &AutoCommit) -> Vec<String> {
        doc.keys(ROOT).collect()
    }

    #[test]
    fn divergent_documents_converge_and_both_sides_end() {
        let mut a = Side::new(doc_with(1, &["a1", "a2"]), DocSync::initiator());
        let mut b = Side::new(doc_with(2, &["b1"]), DocSync::responder());
        let (sent_a, sent_b) = run(&mut a, &mut b, |m| m).expect("in turn");
        assert_eq!(keys(&a.doc), vec!["a1", "a2", "b1"]);
        assert_eq!(keys(&a.doc), keys(&b.doc));
        assert_eq!(a.doc.get_heads(), b.doc.get_heads());
        assert!(a.machine.is_done() && b.machine.is_done());
        // Each side speaks in turn, and the initiator ends without a final send.
        assert_eq!(sent_a, sent_b);
        assert!(sent_a <= 4, "{sent_a} rounds for a two-sided difference");
    }

    #[test]
    fn equal_documents_cost_one_exchange_each_way_after_heads() {
        let base = doc_with(1, &["x"]);
        let mut a = Side::new(base.clone(), DocSync::initiator());
        let mut b = Side::new(
            base.clone().with_actor(vec![2; 16].into()),
            DocSync::responder(),
        );
        let (sent_a, sent_b) = run(&mut a, &mut b, |m| m).expect("in turn");
        // Heads out, heads back, then one empty message each way.
        assert_eq!((sent_a, sent_b), (2, 2));
        assert!(a.machine.is_done() && b.machine.is_done());
    }

    #[test]
    fn the_responder_answers_an_empty_opening_before_ending() {
        let mut r = DocSync::responder();
        let Received::Apply(None) = r.receive(None).expect("in turn") else {
            panic!("an empty opening is applied as nothing");
        };
        let out = r.send(None).expect("in turn");
        assert!(out.last && out.message.is_none());
        assert!(r.is_done());
        // The responder with something to say goes on instead.
        let mut r = DocSync::responder();
        r.receive(None).expect("in turn");
        let msg = doc_with(3, &["k"])
            .sync()
            .generate_sync_message(&mut State::new());
        let out = r.send(msg).expect("in turn");
        assert!(!out.last && out.message.is_some());
        assert!(!r.is_done());
    }

    #[test]
    fn the_initiator_ends_silently_only_after_both_were_empty() {
        let mut i = DocSync::initiator();
        i.send(None).expect("in turn");
        assert!(matches!(i.receive(None).expect("in turn"), Received::Done));
        // An empty answer to a non-empty message is not the end: this side may have more.
        let mut i = DocSync::initiator();
        let msg = doc_with(4, &["k"])
            .sync()
            .generate_sync_message(&mut State::new());
        i.send(msg).expect("in turn");
        assert!(matches!(
            i.receive(None).expect("in turn"),
            Received::Apply(None)
        ));
    }

    #[test]
    fn a_session_that_never_settles_stops_at_the_round_limit() {
        // A peer that always has something to say (here: the same valid message, forever).
        let peer_says = doc_with(5, &["k"])
            .sync()
            .generate_sync_message(&mut State::new())
            .expect("in turn")
            .encode();
        let mut r = DocSync::responder();
        let mut received = 0;
        let err = loop {
            match r.receive(Some(&peer_says)) {
                Ok(Received::Apply(_)) => received += 1,
                Ok(Received::Done) => panic!("a responder is not done on receiving"),
                Err(e) => break e,
            }
            r.send(None).expect("in turn");
        };
        assert!(matches!(err, DocSyncError::TooManyRounds), "{err}");
        assert_eq!(received, DOC_SYNC_ROUNDS_MAX);
        assert!(r.is_done());
    }

    #[test]
    fn a_malformed_message_ends_the_session_with_its_kind() {
        let mut a = Side::new(doc_with(1, &["a"]), DocSync::initiator());
        let mut b = Side::new(doc_with(2, &["b"]), DocSync::responder());
        let mut n = 0;
        let err = run(&mut a, &mut b, |m| {
            n += 1;
            if n == 2 {
                Some(vec![0x42, 0xff, 0x00])
            } else {
                m
            }
        })
        .expect_err("the session fails");
        assert!(matches!(err, DocSyncError::Malformed(_)), "{err}");
        assert!(a.machine.is_done(), "the side that got garbage stops");
    }

    #[test]
    fn out_of_turn_calls_are_refused_without_changing_state() {
        let mut i = DocSync::initiator();
        assert!(matches!(
            i.receive(None),
            Err(DocSyncError::OutOfTurn { .. })
        ));
        let mut r = DocSync::responder();
        assert!(matches!(r.send(None), Err(DocSyncError::OutOfTurn { .. })));
        // Both still work in turn afterwards.
        assert!(!i.send(None).expect("in turn").last);
        assert!(matches!(
            r.receive(None).expect("in turn"),
            Received::Apply(None)
        ));
        let mut done = DocSync::responder();
        done.receive(None).expect("in turn");
        done.send(None).expect("in turn");
        assert!(matches!(
            done.receive(None),
            Err(DocSyncError::OutOfTurn { .. })
        ));
    }
}
