//! Built-in modules, one file each in `modules/`, registered by build.rs.

include!(concat!(env!("OUT_DIR"), "/modules.rs"));
