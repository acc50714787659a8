pub mod bench;
pub mod forward;
pub mod generate;
pub mod model;
