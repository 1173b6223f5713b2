//! Groups (SPEC 3.8): two dongles of one user whose CAN frames the server relays to each other, and what
//! the relay needs from the database to know who serves each side.
//!
//! - [`api`]: the API's operations on groups (create, list, activate, deactivate, delete), each checked
//!   against the caller's ownership, audited, and followed by the relay's reaction (new `groups` lists
//!   for the agents concerned, pipes started or stopped).
//! - [`serving`]: the queries the relay needs: which agent serves each side, which groups an agent
//!   serves, a group's sides.
//! - [`model`]: a group's state and the names the database gives sides and directions.
//! - [`links`]: what a pipe needs of the relay: the data connections, the console's feed, the counters.
//! - [`settings`]: the relay's limits and rates.
//! - [`relay`]: the relay of this instance: its data-plane connections, one pipe per active group, and
//!   the events a live console can subscribe to.
//! - [`pipe`]: one group's relay, both directions: acceptance, forwarding, buffering, replay, the state.
//! - [`store`]: where frames wait for a side, one interface over two stores:
//!   - [`buffer`]: the durable buffer in PostgreSQL (`relay_buffer`, `relay_sides`) and its retention;
//!   - [`jetstream`]: the same on a NATS JetStream stream (`serve --nats-url`), positions still in
//!     `relay_sides`.
//! - [`chunk`]: a run of frames with consecutive positions, and cutting frames off its front.
//! - [`console`]: the relay's events on the live console.
//! - [`latency`]: the admins' latency test of a relaying group (probes echoed between its agents).
//! - [`wake`]: wakes this instance's pipes when another instance buffered frames for a side they serve.
//!
//! A group's `mode` column is its state: INACTIVE until activated; once active, ACTIVE while both sides'
//! agents have their data connection open on one instance and nothing is buffered, CROSS_INSTANCE while
//! both are connected but to different instances (frames cross through the buffer), DEGRADED otherwise.
//! Only the relay moves it among those three, and never out of INACTIVE.

pub mod api;
pub mod buffer;
pub mod chunk;
pub mod console;
pub mod data_ws;
pub mod jetstream;
pub mod latency;
pub mod links;
pub mod model;
pub mod pipe;
pub mod relay;
pub mod serving;
pub mod settings;
pub mod store;
pub mod wake;
