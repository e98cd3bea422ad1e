//! Snapshots apart from the code they were taken of.
//!
//! componentize-js builds every JavaScript component around one large core
//! module: the StarlingMonkey engine's code (9 MB) with a memory snapshot of
//! the engine after it ran the application's script (Wizer: data segments
//! and the initial value of the stack pointer). Two applications' main
//! modules differ only in that snapshot, so each deploy used to compile the
//! engine again.
//!
//! [`detach`] moves a main module's snapshot into a small module the
//! component already instantiates first, with no imports (wit-component's
//! shim module): the main module's memory, globals and data segments are
//! defined there and exported, and the main module imports them instead of
//! defining them (`verge:snapshot`). Imports come first in each index space,
//! so every memory and global keeps its index and the code section stays
//! byte for byte the same. The main module then imports its memory and
//! carries no state of its own: a shared library ([`crate::shared`]),
//! compiled once per node for every application built with the same
//! engine. The snapshot's data stays in the component, compiled (into a
//! copy-on-write memory image) with it.
//!
//! Only baseline code is built from the detached component: optimized code
//! compiles the component whole, where the memory is the main module's own
//! (no indirection to reach it). Anything outside what the rewrite handles
//! leaves the component as it is.

use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    ConstExpr, DataCountSection, DataSection, EntityType, ExportKind, ExportSection, GlobalSection,
    ImportSection, InstanceSection, MemorySection, ModuleArg, RawSection,
};
use wasmparser::{
    BinaryReader, DataKind, DataSectionReader, ExportSectionReader, GlobalSectionReader,
    ImportSectionReader, InstanceSectionReader, MemorySectionReader, Operator, Parser, TypeRef,
};

use crate::shared::{MIN_LIBRARY_CODE, Section, sections};

/// The import module name under which a main module finds its snapshot.
pub(crate) const SNAPSHOT_MODULE: &str = "verge:snapshot";

/// Section ids of a core module, and their order.
const ORDER: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 10, 11];

fn rank(id: u8) -> Option<usize> {
    ORDER.iter().position(|i| *i == id)
}

/// A core instance of the component: the module it instantiates and how
/// many arguments it gets (`None`: made from exports).
struct Instantiation {
    module: Option<u32>,
    args: usize,
}

/// The component with its main module's snapshot detached, or `None` when
/// it has no module this applies to.
pub(crate) fn detach(bytes: &[u8]) -> Option<Vec<u8>> {
    if !Parser::is_component(bytes) {
        return None;
    }
    let top = sections(bytes)?;
    // Core modules by index (each module section defines one; a component
    // that imports core modules is left alone) and core instances in order.
    let mut modules: Vec<usize> = Vec::new();
    let mut instances: Vec<(usize, Instantiation)> = Vec::new();
    for (i, s) in top.iter().enumerate() {
        match s.id {
            1 => modules.push(i),
            2 => {
                let reader =
                    InstanceSectionReader::new(BinaryReader::new(&bytes[s.start..s.end], s.start))
                        .ok()?;
                for instance in reader {
                    let instance = match instance.ok()? {
                        wasmparser::Instance::Instantiate { module_index, args } => Instantiation {
                            module: Some(module_index),
                            args: args.len(),
                        },
                        wasmparser::Instance::FromExports(_) => Instantiation {
                            module: None,
                            args: 0,
                        },
                    };
                    instances.push((i, instance));
                }
            }
            // Imports and outer aliases of core modules would move the
            // module indices counted here.
            10 | 6 if mentions_core_modules(bytes, s) => return None,
            _ => {}
        }
    }
    // The main module: instantiated once, defining its memory and data.
    let (main_index, main) = modules.iter().enumerate().find_map(|(m, &section)| {
        let s = &top[section];
        let snapshot = Snapshot::of(&bytes[s.start..s.end])?;
        let mut uses = instances
            .iter()
            .enumerate()
            .filter(|(_, (_, inst))| inst.module == Some(m as u32));
        let (at, _) = uses.next()?;
        uses.next().is_none().then_some((m, (at, snapshot)))
    })?;
    let (main_instance, snapshot) = main;
    // The carrier: a module instantiated once, before the main module, with
    // no imports, no memory and no data of its own.
    let (shim_index, shim_instance) = modules.iter().enumerate().find_map(|(m, &section)| {
        if m == main_index {
            return None;
        }
        let mut uses = instances
            .iter()
            .enumerate()
            .filter(|(_, (_, inst))| inst.module == Some(m as u32));
        let (at, (_, inst)) = uses.next()?;
        if uses.next().is_some() || inst.args != 0 || at >= main_instance {
            return None;
        }
        let s = &top[section];
        carrier(&bytes[s.start..s.end]).then_some((m, at as u32))
    })?;

    let new_main = snapshot.main_without()?;
    let shim_section = &top[modules[shim_index]];
    let new_shim = snapshot.into_carrier(&bytes[shim_section.start..shim_section.end])?;
    for module in [&new_main, &new_shim] {
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(module)
            .ok()?;
    }

    // The component: the two modules replaced, the main module's
    // instantiation given the carrier's instance.
    let main_section = instances[main_instance].0;
    let mut out = wasm_encoder::Component::new();
    for (i, s) in top.iter().enumerate() {
        let contents = &bytes[s.start..s.end];
        if i == modules[main_index] {
            out.section(&RawSection {
                id: 1,
                data: &new_main,
            });
        } else if i == modules[shim_index] {
            out.section(&RawSection {
                id: 1,
                data: &new_shim,
            });
        } else if i == main_section {
            out.section(&with_snapshot_arg(
                contents,
                s.start,
                main_index as u32,
                shim_instance,
            )?);
        } else {
            out.section(&RawSection {
                id: s.id,
                data: contents,
            });
        }
    }
    Some(out.finish())
}

/// Does this import (10) or alias (6) section bring in core modules?
fn mentions_core_modules(bytes: &[u8], s: &Section) -> bool {
    let data = &bytes[s.start..s.end];
    let reader = BinaryReader::new(data, s.start);
    match s.id {
        10 => match wasmparser::ComponentImportSectionReader::new(reader) {
            Ok(r) => r.into_iter().any(|i| {
                i.map_or(true, |i| {
                    matches!(i.ty, wasmparser::ComponentTypeRef::Module(_))
                })
            }),
            Err(_) => true,
        },
        6 => match wasmparser::ComponentAliasSectionReader::new(reader) {
            Ok(r) => r.into_iter().any(|a| {
                a.map_or(true, |a| {
                    matches!(
                        a,
                        wasmparser::ComponentAlias::Outer {
                            kind: wasmparser::ComponentOuterAliasKind::CoreModule,
                            ..
                        }
                    )
                })
            }),
            Err(_) => true,
        },
        _ => false,
    }
}

/// Can this module carry a snapshot: no imports, no memory, no data?
fn carrier(module: &[u8]) -> bool {
    let Some(secs) = module_sections(module) else {
        return false;
    };
    !secs.iter().any(|s| matches!(s.id, 2 | 5 | 11 | 12))
}

/// A core module's sections.
fn module_sections(module: &[u8]) -> Option<Vec<Section>> {
    if !Parser::is_core_wasm(module) {
        return None;
    }
    sections(module)
}

/// The state of a main module: its memory, globals and data.
struct Snapshot<'a> {
    module: &'a [u8],
    secs: Vec<Section>,
    memory: wasm_encoder::MemoryType,
    /// Defined globals: type and initial value.
    globals: Vec<(wasm_encoder::GlobalType, ConstExpr)>,
    data: DataSection,
}

impl<'a> Snapshot<'a> {
    /// The snapshot of a main module: one defined memory (none imported),
    /// globals with constant initial values, active data segments at
    /// constant offsets, and at least [`MIN_LIBRARY_CODE`] bytes of code.
    fn of(module: &'a [u8]) -> Option<Self> {
        let secs = module_sections(module)?;
        let mut re = RoundtripReencoder;
        let mut memory = None;
        let mut globals = Vec::new();
        let mut data = None;
        let mut code = 0usize;
        for s in &secs {
            let reader = BinaryReader::new(&module[s.start..s.end], s.start);
            match s.id {
                2 => {
                    for import in ImportSectionReader::new(reader).ok()?.into_imports() {
                        if matches!(import.ok()?.ty, TypeRef::Memory(_)) {
                            return None;
                        }
                    }
                }
                5 => {
                    let mut mems = MemorySectionReader::new(reader).ok()?.into_iter();
                    let m = mems.next()?.ok()?;
                    if mems.next().is_some() || m.shared || m.memory64 {
                        return None;
                    }
                    memory = Some(re.memory_type(m).ok()?);
                }
                6 => {
                    for g in GlobalSectionReader::new(reader).ok()? {
                        let g = g.ok()?;
                        if !is_constant(&g.init_expr) {
                            return None;
                        }
                        globals
                            .push((re.global_type(g.ty).ok()?, re.const_expr(g.init_expr).ok()?));
                    }
                }
                11 => {
                    let mut out = DataSection::new();
                    for d in DataSectionReader::new(reader).ok()? {
                        let d = d.ok()?;
                        let DataKind::Active {
                            memory_index: 0,
                            offset_expr,
                        } = &d.kind
                        else {
                            return None;
                        };
                        if !is_constant(offset_expr) {
                            return None;
                        }
                        out.active(
                            0,
                            &re.const_expr(offset_expr.clone()).ok()?,
                            d.data.iter().copied(),
                        );
                    }
                    data = Some(out);
                }
                10 => code = s.end - s.start,
                _ => {}
            }
        }
        if (code as u64) < MIN_LIBRARY_CODE {
            return None;
        }
        Some(Self {
            module,
            secs,
            memory: memory?,
            globals,
            data: data?,
        })
    }

    /// The main module importing its memory and globals from
    /// [`SNAPSHOT_MODULE`], without its data.
    fn main_without(&self) -> Option<Vec<u8>> {
        let mut re = RoundtripReencoder;
        let mut out = wasm_encoder::Module::new();
        let mut imported = false;
        let add_imports = |imports: &mut ImportSection| {
            imports.import(SNAPSHOT_MODULE, "memory", EntityType::Memory(self.memory));
            for (i, (ty, _)) in self.globals.iter().enumerate() {
                imports.import(
                    SNAPSHOT_MODULE,
                    &format!("global{i}"),
                    EntityType::Global(*ty),
                );
            }
        };
        for s in &self.secs {
            let contents = &self.module[s.start..s.end];
            // Imports go before any section ranked after them.
            if !imported && rank(s.id).is_some_and(|r| r > 1) {
                let mut imports = ImportSection::new();
                add_imports(&mut imports);
                out.section(&imports);
                imported = true;
            }
            match s.id {
                2 => {
                    let mut imports = ImportSection::new();
                    let reader =
                        ImportSectionReader::new(BinaryReader::new(contents, s.start)).ok()?;
                    re.parse_import_section(&mut imports, reader).ok()?;
                    add_imports(&mut imports);
                    out.section(&imports);
                    imported = true;
                }
                5 | 6 | 11 | 12 => {}
                id => {
                    out.section(&RawSection { id, data: contents });
                }
            }
        }
        Some(out.finish())
    }

    /// The carrier module with the snapshot: the memory, the globals after
    /// its own, the data, and their exports under the names the main module
    /// imports.
    fn into_carrier(self, carrier: &[u8]) -> Option<Vec<u8>> {
        let secs = module_sections(carrier)?;
        let mut re = RoundtripReencoder;
        // Its own globals come first: the snapshot's follow.
        let mut own_globals = 0u32;
        for s in &secs {
            if s.id == 6 {
                own_globals =
                    GlobalSectionReader::new(BinaryReader::new(&carrier[s.start..s.end], s.start))
                        .ok()?
                        .count();
            }
        }
        let globals = |section: &mut GlobalSection| {
            for (ty, init) in &self.globals {
                section.global(*ty, init);
            }
        };
        let exports = |section: &mut ExportSection| {
            section.export("memory", ExportKind::Memory, 0);
            for i in 0..self.globals.len() as u32 {
                section.export(&format!("global{i}"), ExportKind::Global, own_globals + i);
            }
        };
        let mut out = wasm_encoder::Module::new();
        let mut done = [false; 4]; // memory, global, export, data count
        let emit_before = |out: &mut wasm_encoder::Module, done: &mut [bool; 4], upto: usize| {
            if !done[0] && upto > rank(5).unwrap_or(4) {
                let mut m = MemorySection::new();
                m.memory(self.memory);
                out.section(&m);
                done[0] = true;
            }
            if !done[1] && upto > rank(6).unwrap_or(5) {
                let mut g = GlobalSection::new();
                globals(&mut g);
                out.section(&g);
                done[1] = true;
            }
            if !done[2] && upto > rank(7).unwrap_or(6) {
                let mut e = ExportSection::new();
                exports(&mut e);
                out.section(&e);
                done[2] = true;
            }
            if !done[3] && upto > rank(12).unwrap_or(9) {
                out.section(&DataCountSection {
                    count: self.data.len(),
                });
                done[3] = true;
            }
        };
        for s in &secs {
            let contents = &carrier[s.start..s.end];
            if let Some(r) = rank(s.id) {
                emit_before(&mut out, &mut done, r);
            }
            match s.id {
                6 => {
                    let mut g = GlobalSection::new();
                    re.parse_global_section(
                        &mut g,
                        GlobalSectionReader::new(BinaryReader::new(contents, s.start)).ok()?,
                    )
                    .ok()?;
                    globals(&mut g);
                    out.section(&g);
                    done[1] = true;
                }
                7 => {
                    let mut e = ExportSection::new();
                    re.parse_export_section(
                        &mut e,
                        ExportSectionReader::new(BinaryReader::new(contents, s.start)).ok()?,
                    )
                    .ok()?;
                    exports(&mut e);
                    out.section(&e);
                    done[2] = true;
                }
                id => {
                    out.section(&RawSection { id, data: contents });
                }
            }
        }
        emit_before(&mut out, &mut done, ORDER.len());
        out.section(&self.data);
        Some(out.finish())
    }
}

/// A constant expression of one value (`i32.const` and the like).
fn is_constant(expr: &wasmparser::ConstExpr<'_>) -> bool {
    let mut ops = expr.get_operators_reader();
    let first = ops.read().ok();
    let second = ops.read().ok();
    matches!(
        first,
        Some(
            Operator::I32Const { .. }
                | Operator::I64Const { .. }
                | Operator::F32Const { .. }
                | Operator::F64Const { .. }
        )
    ) && matches!(second, Some(Operator::End))
}

/// The core instance section `contents` with one more argument to the
/// instantiation of `main`: the carrier's instance as [`SNAPSHOT_MODULE`].
fn with_snapshot_arg(
    contents: &[u8],
    offset: usize,
    main: u32,
    carrier: u32,
) -> Option<InstanceSection> {
    let reader = InstanceSectionReader::new(BinaryReader::new(contents, offset)).ok()?;
    let mut out = InstanceSection::new();
    for instance in reader {
        match instance.ok()? {
            wasmparser::Instance::Instantiate { module_index, args } => {
                let mut list: Vec<(String, ModuleArg)> = args
                    .iter()
                    .map(|a| match a.kind {
                        wasmparser::InstantiationArgKind::Instance => {
                            Some((a.name.to_string(), ModuleArg::Instance(a.index)))
                        }
                    })
                    .collect::<Option<_>>()?;
                if module_index == main {
                    list.push((SNAPSHOT_MODULE.to_string(), ModuleArg::Instance(carrier)));
                }
                out.instantiate(module_index, list.iter().map(|(n, a)| (n.as_str(), *a)));
            }
            wasmparser::Instance::FromExports(exports) => {
                let mut re = RoundtripReencoder;
                let items: Vec<(String, ExportKind, u32)> = exports
                    .iter()
                    .map(|e| Some((e.name.to_string(), re.export_kind(e.kind).ok()?, e.index)))
                    .collect::<Option<_>>()?;
                out.export_items(items.iter().map(|(n, k, i)| (n.as_str(), *k, *i)));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::tests::answer;
    use wasmtime::Engine;

    /// A component shaped like componentize-js's: a shim module with no
    /// imports instantiated first, then a main module owning a memory with
    /// data (`value` at address 8) and a global, which the exported
    /// function reads.
    fn component(value: u8, stack: i32) -> Vec<u8> {
        // Enough code to count as a library (the threshold is for code).
        let body = "i32.const 100000 drop ".repeat(5000);
        let filler: String = (0..4)
            .map(|i| format!("(func (export \"f{i}\") {body})\n"))
            .collect();
        wat::parse_str(format!(
            r#"(component
              (core module $main
                (import "shim" "one" (func $one (result i32)))
                (memory (export "memory") 1)
                (global $sp (mut i32) (i32.const {stack}))
                (data (i32.const 8) "\{value:02x}")
                (func (export "answer") (result i32)
                  (i32.add
                    (i32.add (i32.load8_u (i32.const 8)) (global.get $sp))
                    (call $one)))
                {filler})
              (core module $shim
                (global $own (mut i32) (i32.const 0))
                (func (export "one") (result i32) i32.const 1))
              (core instance $s (instantiate $shim))
              (core instance $m (instantiate $main (with "shim" (instance $s))))
              (func (export "answer") (result u32) (canon lift (core func $m "answer"))))"#
        ))
        .unwrap()
    }

    #[test]
    fn a_detached_snapshot_behaves_the_same_and_its_code_is_shared() {
        let engine = Engine::default();
        let a = component(40, 100);
        let b = component(2, 1000);
        assert_eq!(answer(&engine, &a, &[]), 141);
        assert_eq!(answer(&engine, &b, &[]), 1003);
        let (da, db) = (detach(&a).expect("detached"), detach(&b).expect("detached"));
        assert_eq!(answer(&engine, &da, &[]), 141);
        assert_eq!(answer(&engine, &db, &[]), 1003);
        // The main modules, without their snapshots, are one library.
        let (sa, sb) = (
            crate::shared::split(&da).expect("a library"),
            crate::shared::split(&db).expect("a library"),
        );
        assert_eq!(sa.libraries.len(), 1);
        assert_eq!(sa.libraries[0].sha256, sb.libraries[0].sha256);
        assert_eq!(answer(&engine, &sa.component, &sa.libraries), 141);
        assert_eq!(answer(&engine, &sb.component, &sb.libraries), 1003);
    }

    #[test]
    fn components_of_another_shape_stay_whole() {
        // No carrier module.
        let plain = wat::parse_str(
            r#"(component
              (core module $m (memory 1) (data (i32.const 0) "x") (func (export "f")))
              (core instance (instantiate $m)))"#,
        )
        .unwrap();
        assert!(detach(&plain).is_none());
        assert!(detach(b"garbage").is_none());
        assert!(detach(b"\0asm\x01\0\0\0").is_none());
    }
}
