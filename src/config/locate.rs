//! Positions of keys in the YAML source.
//!
//! serde only reports positions for the first type error; semantic validation
//! runs on the typed `Config`, which has no positions left. This module scans
//! the text once with yaml-rust2's marked event parser and records, for every
//! dotted key path (`upstreams[0].backends[1].weight`), where its key starts,
//! so validation errors can point at the exact line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// Map from dotted key path to the 1-based (line, column) of the key.
///
/// Mapping entries are located at their key; sequence items at the item
/// itself. The document root is the empty path.
#[derive(Debug, Default)]
pub(crate) struct KeyLocations {
    map: HashMap<String, (usize, usize)>,
}

/// The collection currently being walked, with the path of its node.
///
/// `path` is `None` inside a complex (non-scalar) mapping key, whose contents
/// have no dotted path.
enum Frame {
    Map {
        path: Option<String>,
        /// Path of the value that follows, once its key has been read;
        /// `None` while the next node is a key.
        value_path: Option<Option<String>>,
        /// A sequence item or the root whose position is not recorded yet:
        /// it is taken from the first key, because yaml-rust2 marks a block
        /// mapping's start after its first key's first character.
        pending: Option<(String, Marker)>,
    },
    Seq {
        path: Option<String>,
        index: usize,
    },
}

impl KeyLocations {
    /// Scans `text`; on a YAML syntax error keeps what was seen before it,
    /// because the syntax error itself is reported by serde_yaml_ng.
    pub(crate) fn scan(text: &str) -> Self {
        let mut locations = KeyLocations::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Ok((event, mark)) = parser.next_token() {
            match event {
                Event::StreamEnd | Event::DocumentEnd => break,
                Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
                Event::Scalar(value, ..) => {
                    if let Some(Frame::Map {
                        path,
                        value_path: value_path @ None,
                        pending,
                    }) = stack.last_mut()
                    {
                        // A scalar in key position: record where the key is,
                        // and where its mapping starts if that is still open.
                        if let Some((item, _)) = pending.take() {
                            locations.insert_key(item, mark);
                        }
                        let key_path = path.as_deref().map(|p| join_key(p, &value));
                        if let Some(key_path) = &key_path {
                            locations.insert_key(key_path.clone(), mark);
                        }
                        *value_path = Some(key_path);
                    } else {
                        locations.enter_node(&mut stack, mark);
                        finish_node(&mut stack);
                    }
                }
                Event::Alias(_) => {
                    locations.enter_node(&mut stack, mark);
                    finish_node(&mut stack);
                }
                Event::MappingStart(..) => {
                    let (path, own_position) = node_path(&stack);
                    let pending = match (&path, own_position) {
                        (Some(p), true) => Some((p.clone(), mark)),
                        _ => None,
                    };
                    stack.push(Frame::Map {
                        path,
                        value_path: None,
                        pending,
                    });
                }
                Event::SequenceStart(..) => {
                    let path = locations.enter_node(&mut stack, mark);
                    stack.push(Frame::Seq { path, index: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    // An empty mapping has no first key: use its own mark.
                    if let Some(Frame::Map {
                        pending: Some((item, start)),
                        ..
                    }) = stack.pop()
                    {
                        locations.insert_key(item, start);
                    }
                    finish_node(&mut stack);
                }
            }
        }
        locations
    }

    /// Position of `path` if the file spells it out.
    pub(crate) fn get(&self, path: &str) -> Option<(usize, usize)> {
        self.map.get(path).copied()
    }

    /// Position of `path`, or of its nearest ancestor present in the file
    /// (a defaulted key has no position of its own); the document start when
    /// nothing on the way is present.
    pub(crate) fn locate(&self, path: &str) -> (usize, usize) {
        let mut current = path;
        loop {
            if let Some(position) = self.get(current) {
                return position;
            }
            if current.is_empty() {
                return (1, 1);
            }
            current = parent_path(current);
        }
    }

    fn insert_key(&mut self, path: String, mark: Marker) {
        // The first occurrence wins: serde_yaml_ng reports duplicate keys, and
        // an error is most useful at the first spelling.
        self.map
            .entry(path)
            .or_insert((mark.line(), mark.col() + 1));
    }

    /// Registers a scalar, alias or sequence node that is not a mapping key
    /// and returns its path.
    fn enter_node(&mut self, stack: &mut [Frame], mark: Marker) -> Option<String> {
        let (path, own_position) = node_path(stack);
        if let (Some(path), true) = (&path, own_position) {
            self.insert_key(path.clone(), mark);
        }
        path
    }
}

/// Path of the node about to start, and whether it needs a position of its
/// own: sequence items and the root do, mapping values are already located
/// at their key.
fn node_path(stack: &[Frame]) -> (Option<String>, bool) {
    match stack.last() {
        None => (Some(String::new()), true),
        Some(Frame::Seq { path, index }) => {
            (path.as_deref().map(|p| format!("{p}[{index}]")), true)
        }
        // A collection used as a mapping key has no dotted path.
        Some(Frame::Map {
            value_path: None, ..
        }) => (None, false),
        Some(Frame::Map {
            value_path: Some(value_path),
            ..
        }) => (value_path.clone(), false),
    }
}

/// Advances the enclosing collection past the node that just ended.
fn finish_node(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Seq { index, .. }) => *index += 1,
        Some(Frame::Map { value_path, .. }) => {
            *value_path = match value_path {
                // A complex key ended: its value follows, without a path.
                None => Some(None),
                // A value ended: the next node is a key.
                Some(_) => None,
            };
        }
        None => {}
    }
}

/// `parent.key`, or `key` at the root.
fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Strips the last segment (`.key` or `[index]`) of a dotted path.
pub(crate) fn parent_path(path: &str) -> &str {
    if path.ends_with(']') {
        if let Some(open) = path.rfind('[') {
            return &path[..open];
        }
    }
    match path.rfind('.') {
        Some(dot) => &path[..dot],
        None => "",
    }
}
