//! Shared libraries inside components.
//!
//! Toolchains that link a language runtime dynamically (componentize-py links
//! CPython, its libc and its extensions as separate core modules) put the
//! same large core modules, byte for byte, into every component they build:
//! the Python hello and a Python shop differ only in a small main module that
//! owns the memory snapshot. Compiling those runtime modules again for every
//! deploy is most of a Python deploy's time.
//!
//! [`split`] rewrites a component so that each such module (a *library*: a
//! core module of at least [`MIN_LIBRARY_CODE`] bytes of code that imports
//! its memory instead of defining one, so it carries no per-application
//! state) becomes an import of a core module named `verge-shared-x<sha256>`,
//! typed exactly by the module's own imports and exports. The host compiles
//! each library once per engine, caches it by its sha256 like a component,
//! and links it into every component that names it. The rest of the
//! component, byte for byte unchanged, compiles as before; semantics are
//! unchanged (a component instantiates an imported module just as one it
//! defines).
//!
//! The rewrite only appends core types (each new module type is defined
//! after every core type of the original), so no index of the original
//! component moves. Anything this module does not understand (a module type
//! it cannot express, a parse error) leaves the component as it is.

use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    ComponentImportSection, ComponentTypeRef, CoreTypeSection, EntityType, ModuleType, RawSection,
};
use wasmparser::{
    BinaryReader, ComponentAlias, ComponentAliasSectionReader, ComponentOuterAliasKind,
    CompositeInnerType, ExternalKind, Parser, Payload, TypeRef,
};

/// Code size from which a memory-importing core module is shared.
pub(crate) const MIN_LIBRARY_CODE: u64 = 64 << 10;

/// Prefix of the import names of shared libraries.
pub(crate) const IMPORT_PREFIX: &str = "verge-shared-x";

/// A component whose libraries became imports.
pub(crate) struct Split {
    /// The rewritten component.
    pub component: Vec<u8>,
    /// The libraries it imports, in import order.
    pub libraries: Vec<Library>,
}

/// One shared core module.
pub(crate) struct Library {
    /// sha256 (hex) of the module's bytes.
    pub sha256: String,
    /// The module's bytes (a whole core module).
    pub bytes: Vec<u8>,
}

impl Library {
    /// The name the rewritten component imports this library under.
    pub(crate) fn import_name(&self) -> String {
        import_name(&self.sha256)
    }
}

pub(crate) fn import_name(sha256: &str) -> String {
    format!("{IMPORT_PREFIX}{sha256}")
}

/// The sha256 named by a library import, if `name` is one.
pub(crate) fn library_of(name: &str) -> Option<&str> {
    let sha = name.strip_prefix(IMPORT_PREFIX)?;
    (sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(sha)
}

/// A top-level section of a component.
pub(crate) struct Section {
    pub(crate) id: u8,
    /// The section's contents (without id and size).
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Rewrites `bytes` with its libraries as imports; `None` when it has none
/// (or when anything about it is outside what the rewrite handles).
pub(crate) fn split(bytes: &[u8]) -> Option<Split> {
    split_with(bytes, MIN_LIBRARY_CODE)
}

/// [`split`] with another threshold of code size (tests use tiny modules).
fn split_with(bytes: &[u8], min_code: u64) -> Option<Split> {
    if !Parser::is_component(bytes) {
        return None;
    }
    let sections = sections(bytes)?;
    // Core types defined so far, and the index of the last section that
    // defines one: only modules after it are replaced, so new core types
    // append to the index space without moving any.
    let mut core_types = 0u32;
    let mut last_type_section = None;
    for (i, s) in sections.iter().enumerate() {
        let defined = match s.id {
            3 => BinaryReader::new(&bytes[s.start..s.end], s.start)
                .read_var_u32()
                .ok()?,
            6 => {
                let reader = ComponentAliasSectionReader::new(BinaryReader::new(
                    &bytes[s.start..s.end],
                    s.start,
                ))
                .ok()?;
                let mut n = 0;
                for alias in reader {
                    if let ComponentAlias::Outer {
                        kind: ComponentOuterAliasKind::CoreType,
                        ..
                    } = alias.ok()?
                    {
                        n += 1;
                    }
                }
                n
            }
            _ => 0,
        };
        if defined > 0 {
            core_types = core_types.checked_add(defined)?;
            last_type_section = Some(i);
        }
    }

    let mut out = wasm_encoder::Component::new();
    let mut libraries = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        let contents = &bytes[s.start..s.end];
        let eligible = s.id == 1 && last_type_section.is_none_or(|last| i > last);
        let library = if eligible {
            module_type(contents, min_code)
        } else {
            None
        };
        match library {
            Some(ty) => {
                let sha256 = sha256_hex(contents);
                let mut types = CoreTypeSection::new();
                types.ty().module(&ty);
                out.section(&types);
                let mut import = ComponentImportSection::new();
                import.import(
                    import_name(&sha256).as_str(),
                    ComponentTypeRef::Module(core_types),
                );
                out.section(&import);
                core_types = core_types.checked_add(1)?;
                libraries.push(Library {
                    sha256,
                    bytes: contents.to_vec(),
                });
            }
            None => {
                out.section(&RawSection {
                    id: s.id,
                    data: contents,
                });
            }
        }
    }
    if libraries.is_empty() {
        return None;
    }
    Some(Split {
        component: out.finish(),
        libraries,
    })
}

/// The top-level sections of a component (not of nested ones).
pub(crate) fn sections(bytes: &[u8]) -> Option<Vec<Section>> {
    let mut reader = BinaryReader::new(bytes, 0);
    reader.read_bytes(8).ok()?;
    let mut out = Vec::new();
    while !reader.eof() {
        let id = reader.read_u8().ok()?;
        let size = reader.read_var_u32().ok()? as usize;
        let start = reader.original_position();
        reader.read_bytes(size).ok()?;
        out.push(Section {
            id,
            start,
            end: start + size,
        });
    }
    Some(out)
}

/// The type of a core module that is a library (see the module docs), or
/// `None` for any other module.
fn module_type(module: &[u8], min_code: u64) -> Option<ModuleType> {
    let mut re = RoundtripReencoder;
    let mut ty = ModuleType::new();
    // Type indices of functions, then the types of tables, memories,
    // globals and tags, in index order (imports first).
    let mut funcs: Vec<u32> = Vec::new();
    let mut tables = Vec::new();
    let mut globals = Vec::new();
    let mut memories = Vec::new();
    let mut tags: Vec<EntityType> = Vec::new();
    let mut imports_memory = false;
    let mut exports = Vec::new();
    let mut code = 0u64;
    for payload in Parser::new(0).parse_all(module) {
        match payload.ok()? {
            Payload::TypeSection(reader) => {
                for group in reader {
                    let group = group.ok()?;
                    if group.is_explicit_rec_group() {
                        return None;
                    }
                    let sub = group.into_types().next()?;
                    if !sub.is_final || sub.supertype_idx.is_some() || sub.composite_type.shared {
                        return None;
                    }
                    let CompositeInnerType::Func(f) = &sub.composite_type.inner else {
                        return None;
                    };
                    let params = f
                        .params()
                        .iter()
                        .map(|v| re.val_type(*v).ok())
                        .collect::<Option<Vec<_>>>()?;
                    let results = f
                        .results()
                        .iter()
                        .map(|v| re.val_type(*v).ok())
                        .collect::<Option<Vec<_>>>()?;
                    ty.ty().function(params, results);
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.ok()?;
                    match import.ty {
                        TypeRef::Func(t) => funcs.push(t),
                        TypeRef::Table(t) => tables.push(re.table_type(t).ok()?),
                        TypeRef::Memory(m) => {
                            imports_memory = true;
                            memories.push(re.memory_type(m).ok()?);
                        }
                        TypeRef::Global(g) => globals.push(re.global_type(g).ok()?),
                        TypeRef::Tag(t) => tags.push(EntityType::Tag(re.tag_type(t).ok()?)),
                        TypeRef::FuncExact(_) => return None,
                    }
                    ty.import(import.module, import.name, re.entity_type(import.ty).ok()?);
                }
            }
            Payload::FunctionSection(reader) => {
                for f in reader {
                    funcs.push(f.ok()?);
                }
            }
            Payload::TableSection(reader) => {
                for t in reader {
                    tables.push(re.table_type(t.ok()?.ty).ok()?);
                }
            }
            // A module that defines its memory carries its own state (a
            // snapshot, data): not a library.
            Payload::MemorySection(_) => return None,
            Payload::GlobalSection(reader) => {
                for g in reader {
                    globals.push(re.global_type(g.ok()?.ty).ok()?);
                }
            }
            Payload::TagSection(reader) => {
                for t in reader {
                    tags.push(EntityType::Tag(re.tag_type(t.ok()?).ok()?));
                }
            }
            Payload::ExportSection(reader) => {
                for e in reader {
                    let e = e.ok()?;
                    exports.push((e.name.to_string(), e.kind, e.index));
                }
            }
            Payload::CodeSectionStart { size, .. } => code = u64::from(size),
            _ => {}
        }
    }
    if !imports_memory || code < min_code {
        return None;
    }
    for (name, kind, index) in exports {
        let i = index as usize;
        let entity = match kind {
            ExternalKind::Func | ExternalKind::FuncExact => EntityType::Function(*funcs.get(i)?),
            ExternalKind::Table => EntityType::Table(*tables.get(i)?),
            ExternalKind::Global => EntityType::Global(*globals.get(i)?),
            ExternalKind::Tag => *tags.get(i)?,
            // Only imported memories exist in a library (it may export
            // one again, as a main module whose snapshot is apart does).
            ExternalKind::Memory => EntityType::Memory(*memories.get(i)?),
        };
        ty.export(&name, entity);
    }
    Some(ty)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Engine, Module, Store};

    /// A main module that owns the memory (with a value at address 0) and a
    /// library that imports it and a function from the main module.
    fn component(type_after_library: bool) -> Vec<u8> {
        let late = if type_after_library {
            "(core type (module))"
        } else {
            ""
        };
        wat::parse_str(format!(
            r#"(component
              (core type (module))
              (core module $main
                (memory (export "memory") 1)
                (data (i32.const 0) "\01\00\00\00")
                (func (export "base") (result i32) i32.const 40))
              (core module $lib
                (import "env" "memory" (memory 1))
                (import "env" "base" (func $base (result i32)))
                (global $g (mut i32) (i32.const 0))
                (func (export "answer") (result i32)
                  call $base
                  i32.const 2
                  i32.add
                  i32.const 0
                  i32.load
                  i32.add)
                (export "g" (global $g)))
              {late}
              (core instance $m (instantiate $main))
              (core instance $l (instantiate $lib (with "env" (instance $m))))
              (func (export "answer") (result u32) (canon lift (core func $l "answer"))))"#
        ))
        .unwrap()
    }

    /// Instantiates `bytes` with `libraries` linked and calls its `answer`.
    pub(crate) fn answer(engine: &Engine, bytes: &[u8], libraries: &[Library]) -> u32 {
        let component = Component::new(engine, bytes).unwrap();
        let mut linker = Linker::<()>::new(engine);
        for lib in libraries {
            let module = Module::new(engine, &lib.bytes).unwrap();
            linker.root().module(&lib.import_name(), &module).unwrap();
        }
        let mut store = Store::new(engine, ());
        let instance = linker.instantiate(&mut store, &component).unwrap();
        let f = instance
            .get_typed_func::<(), (u32,)>(&mut store, "answer")
            .unwrap();
        f.call(&mut store, ()).unwrap().0
    }

    #[test]
    fn a_library_becomes_an_import_and_behaves_the_same() {
        let bytes = component(false);
        let split = split_with(&bytes, 0).expect("the library is split off");
        // Only the memory-importing module is a library.
        assert_eq!(split.libraries.len(), 1);
        let lib = &split.libraries[0];
        assert!(wasmparser::Parser::is_core_wasm(&lib.bytes));
        assert_eq!(library_of(&lib.import_name()), Some(lib.sha256.as_str()));
        let engine = Engine::default();
        assert_eq!(answer(&engine, &bytes, &[]), 43);
        assert_eq!(answer(&engine, &split.component, &split.libraries), 43);
        // The same library from another component has the same name.
        let again = split_with(&component(false), 0).unwrap();
        assert_eq!(again.libraries[0].sha256, lib.sha256);
        // Above the threshold nothing is split.
        assert!(split_with(&bytes, MIN_LIBRARY_CODE).is_none());
    }

    #[test]
    fn modules_before_a_later_core_type_stay() {
        // A new core type there would move the later one's index.
        assert!(split_with(&component(true), 0).is_none());
    }

    #[test]
    fn library_names_round_trip() {
        let sha = "ab".repeat(32);
        assert_eq!(library_of(&import_name(&sha)), Some(sha.as_str()));
        assert_eq!(library_of("verge-shared-xabc"), None);
        assert_eq!(library_of("wasi:cli/environment@0.2.0"), None);
    }

    #[test]
    fn components_without_libraries_stay_whole() {
        let plain = wat::parse_str("(component (core module (func)))").unwrap();
        assert!(split(&plain).is_none());
        assert!(split(b"\0asm\x01\0\0\0").is_none());
        assert!(split(b"garbage").is_none());
    }
}
