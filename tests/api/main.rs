//! Black-box API tests: each starts the real server on 127.0.0.1 port 0
//! with a fresh store and speaks HTTP to it.

mod analytics;
mod browser;
mod config;
mod crash;
mod events;
mod guide;
mod helpers;
mod hostile;
mod ingest;
mod lifecycle;
mod logs;
mod observability;
mod platforms;
mod queue;
mod rescore;
mod scale;
mod secrets;
mod surface;
mod upgrade;
