//! Property test: any tree written as EROFS reads back identically (names of any bytes,
//! modes, owners, times, xattrs, symlinks, devices, hardlinks, chunk references, holes).

use hoist_format::erofs::{self, Device, Image};
use hoist_format::tree::{ChunkRef, Metadata, Node, NodeId, NodeKind, Tree};
use proptest::prelude::*;
use std::collections::BTreeMap;

const CHUNK_BITS: u8 = 16;

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
        1..40,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
    .prop_map(|mut n| {
        if n.len() > 30 {
            // Some names at the 255-byte limit.
            n.resize(255, b'x');
        }
        n
    })
}

fn meta() -> impl Strategy<Value = Metadata> {
    (
        0u32..0o10000,
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        0u32..1_000_000_000,
        prop::collection::btree_map(
            (
                prop::sample::select(vec!["user.", "trusted.", "security."]),
                "[a-z.]{1,20}",
            )
                .prop_map(|(p, s)| format!("{p}{s}").into_bytes()),
            prop::collection::vec(any::<u8>(), 0..300),
            0..4,
        ),
    )
        .prop_map(|(mode, uid, gid, mtime, mtime_nsec, xattrs)| Metadata {
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs,
        })
}

#[derive(Debug, Clone)]
enum Leaf {
    File(u64, Vec<ChunkRef>),
    Symlink(Vec<u8>),
    Dev(bool, u32, u32),
    Fifo,
    /// A hardlink to the n-th leaf created so far.
    Link(usize),
}

fn leaf() -> impl Strategy<Value = Leaf> {
    prop_oneof![
        (0u64..(5 << CHUNK_BITS)).prop_flat_map(|size| {
            let n = size.div_ceil(1 << CHUNK_BITS) as usize;
            let chunk = prop_oneof![
                Just(ChunkRef::Hole),
                (1u16..=3, 0u32..1000)
                    .prop_map(|(device, blkaddr)| ChunkRef::Mapped { device, blkaddr })
            ];
            prop::collection::vec(chunk, n..=n).prop_map(move |c| Leaf::File(size, c))
        }),
        prop::collection::vec(1u8..=255, 1..300).prop_map(Leaf::Symlink),
        (any::<bool>(), 0u32..4096, 0u32..0x10_0000).prop_map(|(c, ma, mi)| Leaf::Dev(c, ma, mi)),
        Just(Leaf::Fifo),
        (0usize..8).prop_map(Leaf::Link),
    ]
}

/// Builds a tree from a flat plan: (directory depth choice, name, metadata, leaf or dir).
fn build(plan: Vec<(usize, Vec<u8>, Metadata, Option<Leaf>)>, root: Metadata) -> Tree {
    let mut tree = Tree::new(root);
    let mut dirs: Vec<NodeId> = vec![Tree::ROOT];
    let mut leaves: Vec<NodeId> = Vec::new();
    for (pick, name, meta, leaf) in plan {
        let parent = dirs[pick % dirs.len()];
        if tree.dir(parent).unwrap().contains_key(&name) {
            continue;
        }
        let id = match leaf {
            None => {
                let id = tree.add(Node {
                    meta,
                    kind: NodeKind::Dir(BTreeMap::new()),
                });
                dirs.push(id);
                id
            }
            Some(Leaf::Link(i)) if !leaves.is_empty() => leaves[i % leaves.len()],
            Some(Leaf::Link(_)) => continue,
            Some(l) => {
                let kind = match l {
                    Leaf::File(size, chunks) => NodeKind::File { size, chunks },
                    Leaf::Symlink(t) => NodeKind::Symlink(t),
                    Leaf::Dev(true, major, minor) => NodeKind::CharDev { major, minor },
                    Leaf::Dev(false, major, minor) => NodeKind::BlockDev { major, minor },
                    _ => NodeKind::Fifo,
                };
                let id = tree.add(Node { meta, kind });
                leaves.push(id);
                id
            }
        };
        tree.dir_mut(parent).unwrap().insert(name, id);
    }
    tree
}

/// A canonical dump of a tree: one line per path.
fn dump_tree(tree: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let mut first_path: BTreeMap<NodeId, Vec<u8>> = BTreeMap::new();
    fn go(
        tree: &Tree,
        id: NodeId,
        path: Vec<u8>,
        out: &mut Vec<String>,
        first: &mut BTreeMap<NodeId, Vec<u8>>,
    ) {
        let n = &tree.nodes[id];
        let kind = match &n.kind {
            NodeKind::Dir(_) => "dir".to_string(),
            NodeKind::File { size, chunks } => format!("file {size} {chunks:?}"),
            NodeKind::Symlink(t) => format!("symlink {t:?}"),
            NodeKind::CharDev { major, minor } => format!("chr {major}:{minor}"),
            NodeKind::BlockDev { major, minor } => format!("blk {major}:{minor}"),
            NodeKind::Fifo => "fifo".into(),
            NodeKind::Socket => "sock".into(),
        };
        let link = if matches!(n.kind, NodeKind::Dir(_)) {
            String::new()
        } else {
            format!("{:?}", first.entry(id).or_insert(path.clone()))
        };
        out.push(format!("{path:?} {kind} {:?} link={link}", n.meta));
        if let NodeKind::Dir(entries) = &n.kind {
            for (name, child) in entries {
                let mut p = path.clone();
                p.push(b'/');
                p.extend_from_slice(name);
                go(tree, *child, p, out, first);
            }
        }
    }
    go(tree, Tree::ROOT, Vec::new(), &mut out, &mut first_path);
    out
}

/// Reads an image back into a tree.
fn read_back(img: &Image<Vec<u8>>) -> Tree {
    let root = img.inode(img.root_nid()).unwrap();
    let meta_of = |i: &erofs::Inode| Metadata {
        mode: i.mode & 0o7777,
        uid: i.uid,
        gid: i.gid,
        mtime: i.mtime,
        mtime_nsec: i.mtime_nsec,
        xattrs: img.xattrs(i).unwrap().into_iter().collect(),
    };
    let mut tree = Tree::new(meta_of(&root));
    let mut by_nid: BTreeMap<u64, NodeId> = BTreeMap::new();
    let mut stack = vec![(root, Tree::ROOT)];
    while let Some((dir, id)) = stack.pop() {
        let entries = img.read_dir(&dir).unwrap();
        let names: Vec<&Vec<u8>> = entries.iter().map(|e| &e.name).collect();
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "directory entries are sorted"
        );
        for e in entries {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let child = img.inode(e.nid).unwrap();
            let node_id = if let Some(&existing) = by_nid.get(&e.nid) {
                existing
            } else {
                let kind = match child.file_type() {
                    0o040000 => NodeKind::Dir(BTreeMap::new()),
                    0o100000 => NodeKind::File {
                        size: child.size,
                        chunks: img.chunks(&child).unwrap(),
                    },
                    0o120000 => NodeKind::Symlink(img.read_link(&child).unwrap()),
                    0o020000 => {
                        let (major, minor) = child.rdev();
                        NodeKind::CharDev { major, minor }
                    }
                    0o060000 => {
                        let (major, minor) = child.rdev();
                        NodeKind::BlockDev { major, minor }
                    }
                    0o010000 => NodeKind::Fifo,
                    _ => NodeKind::Socket,
                };
                let nid = tree.add(Node {
                    meta: meta_of(&child),
                    kind,
                });
                if child.is_dir() {
                    stack.push((child, nid));
                } else {
                    by_nid.insert(e.nid, nid);
                }
                nid
            };
            tree.dir_mut(id).unwrap().insert(e.name, node_id);
        }
    }
    tree
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn trees_round_trip_through_erofs(
        plan in prop::collection::vec((0usize..64, name(), meta(), prop::option::weighted(0.8, leaf())), 0..120),
        root in meta(),
    ) {
        let tree = build(plan, root);
        let devices: Vec<Device> = (0..3).map(|i| Device { tag: [b'a' + i; 64], blocks: 1000 }).collect();
        let image = erofs::write_image(&tree, &devices, &erofs::WriteOptions { chunk_bits: CHUNK_BITS }).unwrap();
        let img = Image::open(image).unwrap();
        prop_assert_eq!(img.devices().len(), 3);
        let back = read_back(&img);
        prop_assert_eq!(dump_tree(&tree), dump_tree(&back));
        // Link counts: every non-directory inode's nlink equals its number of names.
        let mut names: BTreeMap<u64, u32> = BTreeMap::new();
        let mut nlinks: BTreeMap<u64, u32> = BTreeMap::new();
        img.walk(|_, i| { if !i.is_dir() { *names.entry(i.nid).or_default() += 1; nlinks.insert(i.nid, i.nlink); } Ok(()) }).unwrap();
        prop_assert_eq!(names, nlinks);
        // Every path the walk visits is found by bisecting directories, as that inode;
        // a name no directory holds is not.
        let mut paths = Vec::new();
        img.walk(|p, i| { paths.push((p.to_vec(), i.nid)); Ok(()) }).unwrap();
        for (path, nid) in &paths {
            prop_assert_eq!(img.lookup_path(path).unwrap().map(|i| i.nid), Some(*nid));
            // Under a file, or a name no generated tree holds.
            let mut missing = path.clone();
            missing.extend_from_slice(b"/\xff\xfe-none");
            prop_assert_eq!(img.lookup_path(&missing).unwrap().map(|i| i.nid), None);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_reader(bytes in prop::collection::vec(any::<u8>(), 0..20000)) {
        if let Ok(img) = Image::open(bytes) {
            let _ = img.walk(|_, i| { let _ = img.xattrs(i); if i.is_file() { let _ = img.chunks(i); } Ok(()) });
            let _ = img.lookup_path(b"/a/b/../c");
            let _ = img.resolve_path(b"/a/b/../c");
        }
    }
}

#[test]
fn a_directory_of_3000_entries_spans_blocks_and_reads_back() {
    let mut tree = Tree::new(Metadata {
        mode: 0o755,
        ..Default::default()
    });
    let dir = tree.add(Node {
        meta: Metadata::default(),
        kind: NodeKind::Dir(BTreeMap::new()),
    });
    tree.dir_mut(Tree::ROOT)
        .unwrap()
        .insert(b"big".to_vec(), dir);
    for i in 0..3000 {
        let f = tree.add(Node {
            meta: Metadata::default(),
            kind: NodeKind::File {
                size: 0,
                chunks: vec![],
            },
        });
        tree.dir_mut(dir)
            .unwrap()
            .insert(format!("f{i}").into_bytes(), f);
    }
    let img = Image::open(
        erofs::write_image(&tree, &[], &erofs::WriteOptions { chunk_bits: 20 }).unwrap(),
    )
    .unwrap();
    assert_eq!(dump_tree(&tree), dump_tree(&read_back(&img)));
}

/// Issue 19: `hoist convert` wrote trees 5,000 and 10,000 directories deep that `check`
/// and `mount` then refused ("nested too deep"). The writer now refuses what the reader's
/// walk refuses, and writes exactly what it accepts.
#[test]
fn the_writer_refuses_trees_deeper_than_the_reader_walks() {
    use hoist_format::erofs::read::MAX_DEPTH;
    fn chain(levels: usize) -> Tree {
        let mut tree = Tree::new(Metadata::default());
        let mut parent = Tree::ROOT;
        for _ in 0..levels {
            let dir = tree.add(Node {
                meta: Metadata::default(),
                kind: NodeKind::Dir(BTreeMap::new()),
            });
            tree.dir_mut(parent).unwrap().insert(b"d".to_vec(), dir);
            parent = dir;
        }
        tree
    }
    let opts = erofs::WriteOptions { chunk_bits: 20 };
    let deepest = erofs::write_image(&chain(MAX_DEPTH - 1), &[], &opts).unwrap();
    let mut dirs = 0;
    Image::open(deepest)
        .unwrap()
        .walk(|_, i| {
            dirs += usize::from(i.is_dir());
            Ok(())
        })
        .unwrap();
    assert_eq!(dirs, MAX_DEPTH, "the root and {} levels", MAX_DEPTH - 1);
    let err = erofs::write_image(&chain(MAX_DEPTH), &[], &opts).unwrap_err();
    assert!(err.to_string().contains("nested 4096 levels deep"), "{err}");
}

/// `resolve_path` follows symlinks as a process rooted at the image would: a merged-usr
/// `/lib`, a library's relative version link, absolute targets, `..` (which stops at the
/// root), loops and dangling links.
#[test]
fn paths_resolve_through_symlinks_as_a_process_would() {
    let mut tree = Tree::new(Metadata {
        mode: 0o755,
        ..Default::default()
    });
    let add = |tree: &mut Tree, parent: NodeId, name: &str, kind: NodeKind| {
        let mode = match kind {
            NodeKind::Dir(_) => 0o755,
            _ => 0o644,
        };
        let id = tree.add(Node {
            meta: Metadata {
                mode,
                ..Default::default()
            },
            kind,
        });
        tree.dir_mut(parent)
            .unwrap()
            .insert(name.as_bytes().to_vec(), id);
        id
    };
    let dir = || NodeKind::Dir(BTreeMap::new());
    let link = |t: &str| NodeKind::Symlink(t.as_bytes().to_vec());
    let file = || NodeKind::File {
        size: 0,
        chunks: vec![],
    };
    let usr = add(&mut tree, Tree::ROOT, "usr", dir());
    let lib = add(&mut tree, usr, "lib", dir());
    let arch = add(&mut tree, lib, "x86_64-linux-gnu", dir());
    add(&mut tree, arch, "libz.so.1.2.13", file());
    add(&mut tree, arch, "libz.so.1", link("libz.so.1.2.13"));
    add(
        &mut tree,
        arch,
        "abs",
        link("/usr/lib/x86_64-linux-gnu/libz.so.1"),
    );
    add(
        &mut tree,
        arch,
        "up",
        link("../../../../../usr/lib/x86_64-linux-gnu/libz.so.1"),
    );
    add(&mut tree, arch, "loop1", link("loop2"));
    add(&mut tree, arch, "loop2", link("./loop1"));
    add(&mut tree, arch, "dangling", link("nothing"));
    add(&mut tree, arch, "through-file", link("libz.so.1.2.13/x"));
    add(&mut tree, Tree::ROOT, "lib", link("usr/lib"));
    add(
        &mut tree,
        Tree::ROOT,
        "lib64",
        link("/lib/./x86_64-linux-gnu/.."),
    );
    let img = Image::open(
        erofs::write_image(&tree, &[], &erofs::WriteOptions { chunk_bits: 20 }).unwrap(),
    )
    .unwrap();
    let nid_of = |p: &str| img.resolve_path(p.as_bytes()).unwrap().map(|i| i.nid);
    let libz_nid = img
        .lookup_path(b"/usr/lib/x86_64-linux-gnu/libz.so.1.2.13")
        .unwrap()
        .unwrap()
        .nid;
    let lib_nid = img.lookup_path(b"/usr/lib").unwrap().unwrap().nid;
    for p in [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "lib//x86_64-linux-gnu/./libz.so.1.2.13",
        "/usr/lib/x86_64-linux-gnu/abs",
        "/lib/x86_64-linux-gnu/up",
        "/../../lib/x86_64-linux-gnu/libz.so.1",
        "/lib64/x86_64-linux-gnu/libz.so.1",
    ] {
        assert_eq!(nid_of(p), Some(libz_nid), "{p}");
    }
    assert_eq!(nid_of("/lib64"), Some(lib_nid));
    for p in [
        "/lib/x86_64-linux-gnu/loop1",
        "/lib/x86_64-linux-gnu/dangling",
        "/lib/x86_64-linux-gnu/through-file",
        "/lib/x86_64-linux-gnu/libz.so.1/x",
        "/nothing",
    ] {
        assert_eq!(nid_of(p), None, "{p}");
    }
    // Not followed by the plain lookup.
    assert!(!img
        .lookup_path(b"/lib/x86_64-linux-gnu/libz.so.1")
        .unwrap()
        .is_some_and(|i| i.is_file()));
}
