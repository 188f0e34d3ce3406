#![allow(dead_code)]
pub mod guard;
pub mod docker_proxy;
