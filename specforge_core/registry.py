"""Plugin discovery (entry points, group ``specforge``) and the component registry.

Every plugin, bundled or third-party, is a module named by an entry point in the ``specforge``
group. Loading it registers its hook implementations with a pluggy ``PluginManager``; calling the
``register_*`` hooks collects the named components. Nothing here imports a plugin by name.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import logging
from collections.abc import Callable, Iterable
from typing import Any, Optional

import attrs
import pluggy

from specforge_core import hookspecs
from specforge_core.components import conformance_problems
from specforge_core.hookspecs import KINDS, selected

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "specforge"


class RegistryError(Exception):
    """A component could not be found, two plugins claim the same name, a kind has no (or two)
    declared defaults, or a component does not match its contract."""


class DuplicateComponent(RegistryError):
    """Two installed plugins register the same name (neither is left out: the user picks one)."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__


@attrs.define(frozen=True)
class PluginInfo:
    name: str  # entry-point name (or the name given to `register_plugin`)
    module: str
    distribution: str  # distribution that declared the entry point ("" for in-process plugins)
    version: str


@attrs.define(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    config_class: Optional[type]
    description: str
    plugin: PluginInfo


@attrs.define(frozen=True)
class EvalEngine:
    name: str
    run: Callable[..., Any]  # run(request: evaluation.engines.EvalRequest) -> EvalReport
    description: str
    plugin: PluginInfo


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self._collected = False
        # plugins left out, with one line saying why: the entry point failed to import (even with
        # ``sys.exit``), a register hook raised, or a registration broke its contract
        self._broken: list[tuple[PluginInfo, str]] = []
        # kind -> [(component name, declaring plugin)] from ``register_defaults``
        self._default_claims: dict[str, list[tuple[str, PluginInfo]]] = {kind: [] for kind in KINDS}
        self._engines: dict[str, EvalEngine] = {}

    # ---------------------------------------------------------------------------- discovery
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.metadata["Name"] if dist else "",
                version=dist.version if dist else "",
            )
            if any(p.name == info.name for p in self.plugins):
                continue  # the same distribution seen twice on sys.path
            try:
                self._add(ep.load(), info)
            except (Exception, SystemExit) as exc:
                # One broken third-party plugin must not take every command down (pytest and llm
                # behave the same): say so in one line, remember why, go on without it.
                self._leave_out(info, f"plugin {ep.name!r} (entry point {ep.value!r} of "
                                      f"{info.distribution or '?'}) failed to import: {_why(exc)}")

    @property
    def broken(self) -> list[tuple[PluginInfo, str]]:
        """Plugins left out, each with one line saying why (after collecting every hook)."""
        self._collect()
        return list(self._broken)

    def _leave_out(self, info: PluginInfo, why: str) -> None:
        log.warning("%s; continuing without it", why)
        self._broken.append((info, why))
        self.plugins = [p for p in self.plugins if p.name != info.name]
        if self.pm.has_plugin(info.name):
            self.pm.unregister(name=info.name)

    def register_plugin(self, module_or_object: Any, name: str) -> None:
        """Register an in-process plugin (tests, notebooks) as if it came from an entry point; one
        that breaks the rules is left out, named in ``broken``, as an installed one would be."""
        info = PluginInfo(name=name, module=repr(module_or_object), distribution="", version="")
        try:
            self._add(module_or_object, info)
        except RegistryError as exc:
            self._leave_out(info, str(exc))

    def _add(self, plugin: Any, info: PluginInfo) -> None:
        # a @hookimpl whose name is no hook would be ignored by pluggy: the plugin's components would
        # silently be missing (register_loss for register_losses)
        hooks = sorted(n for n, caller in vars(self.pm.hook).items() if getattr(caller, "spec", None))
        for attr in dir(plugin):
            if not attr.startswith("_") and attr not in hooks and self.pm.parse_hookimpl_opts(plugin, attr):
                hint = difflib.get_close_matches(attr, hooks, n=1)
                raise RegistryError(f"plugin {info.name!r}: {attr!r} is marked @hookimpl but is no specforge hook"
                                    + (f"; did you mean {hint[0]!r}?" if hint else f"; hooks: {', '.join(hooks)}"))
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:  # a hook implementation with wrong arguments
            raise RegistryError(f"plugin {info.name!r}: {exc}") from None
        self.plugins.append(info)
        self._collected = False

    # ---------------------------------------------------------------------------- collection
    def _collect(self) -> None:
        if self._collected:
            return
        self._components = {kind: {} for kind in KINDS}
        self._default_claims = {kind: [] for kind in KINDS}
        self._engines = {}
        # Plugin by plugin, each implementation called separately (so we know which plugin
        # registered what). A plugin whose hook raises, or whose registration breaks its contract,
        # is left out whole, with one line naming it; the others are collected as if it were absent.
        impls: dict[str, list[tuple[Optional[str], str, Any]]] = {}
        for kind, hook_name in [*hookspecs.HOOKS.items(), (None, "register_defaults"), ("", "register_eval_engines")]:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                impls.setdefault(impl.plugin_name, []).append((kind, hook_name, impl))
        for plugin_name, calls in impls.items():
            info = self._info(plugin_name)
            components = {kind: dict(named) for kind, named in self._components.items()}
            claims = {kind: list(c) for kind, c in self._default_claims.items()}
            engines = dict(self._engines)
            hook_name = ""
            try:
                for call in calls:
                    kind, hook_name, impl = call
                    if kind is None:
                        impl.function(default=self._declarer(info, claims))
                    elif kind == "":
                        impl.function(register=self._engine_registrar(info, engines))
                    else:
                        impl.function(register=self._registrar(kind, info, components))
            except DuplicateComponent:
                raise
            except (Exception, SystemExit) as exc:
                why = str(exc) if isinstance(exc, RegistryError) else f"its hook {hook_name} raised {_why(exc)}"
                if not why.startswith(f"plugin {info.name!r}"):
                    why = f"plugin {info.name!r}: {why}"
                self._leave_out(info, why)
                continue
            self._components, self._default_claims, self._engines = components, claims, engines
        self._collected = True

    def _info(self, plugin_name: str) -> PluginInfo:
        info = next((p for p in self.plugins if p.name == plugin_name), None)
        return info if info is not None else PluginInfo(plugin_name, repr(self.pm.get_plugin(plugin_name)), "", "")

    def _declarer(self, info: PluginInfo, claims: dict) -> Callable[[str, str], None]:
        def default(kind: str, name: str) -> None:
            if kind not in KINDS:
                raise RegistryError(f"plugin {info.name!r} declares a default for unknown kind {kind!r}; "
                                    f"kinds: {', '.join(KINDS)}")
            if any(p.name == info.name for _n, p in claims[kind]):
                raise RegistryError(f"plugin {info.name!r} declares the default {kind} twice")
            claims[kind].append((name, info))

        return default

    def _engine_registrar(self, info: PluginInfo, engines: dict) -> Callable[..., None]:
        def register(name: str, run: Callable[..., Any], description: str = "") -> None:
            if not isinstance(name, str) or not name or not callable(run):
                raise RegistryError(f"plugin {info.name!r} registered an eval engine without a name or a callable run")
            if name in engines:
                raise DuplicateComponent(f"eval engine {name!r} is registered twice: by plugin "
                                         f"{engines[name].plugin.name!r} and by plugin {info.name!r}; uninstall one")
            engines[name] = EvalEngine(name, run, description, info)

        return register

    def eval_engines(self) -> dict[str, EvalEngine]:
        """Serving engines plugins register (``register_eval_engines``), by name."""
        self._collect()
        return dict(self._engines)

    def _registrar(self, kind: str, info: PluginInfo, components: dict) -> Callable[..., None]:

        def register(
            name: str, factory: Callable[..., Any], config: Optional[type] = None, description: str = ""
        ) -> None:
            if not isinstance(name, str) or not name:
                raise RegistryError(f"plugin {info.name!r} registered a {kind} with an empty name")
            if config is not None and not attrs.has(config):
                raise RegistryError(
                    f"plugin {info.name!r}: config of {kind} {name!r} must be an attrs class, got {config!r}"
                )
            if not callable(factory):
                raise RegistryError(f"plugin {info.name!r}: the factory of {kind} {name!r} is not callable "
                                    f"(got {type(factory).__name__})")
            for contract, obj, what in (("ComponentOptions", config, "options class"),
                                        ("ComponentFactory", factory, "factory")):
                for problem in (conformance_problems(obj, contract, methods_only=contract == "ComponentOptions")
                                if obj is not None else ()):
                    raise RegistryError(f"plugin {info.name!r}: {kind} {name!r}: its {what} {problem}")
            existing = components[kind].get(name)
            if existing is not None:
                raise DuplicateComponent(
                    f"{kind} {name!r} is registered twice: by plugin {existing.plugin.name!r} "
                    f"({existing.plugin.distribution or 'in-process'}) and by plugin {info.name!r} "
                    f"({info.distribution or 'in-process'}); uninstall one of them"
                )
            components[kind][name] = Component(kind, name, factory, config, description, info)

        return register

    # ---------------------------------------------------------------------------- lookup
    def components(self, kind: Optional[str] = None) -> list[Component]:
        self._collect()
        kinds = [kind] if kind else list(KINDS)
        return [c for k in kinds for c in sorted(self._components[k].values(), key=lambda c: c.name)]

    def names(self, kind: str) -> list[str]:
        return [c.name for c in self.components(kind)]

    def default_name(self, kind: str) -> str:
        """The component a plugin declared the default of ``kind`` (``register_defaults``): what an
        empty selector means. Exactly one declaration, of a registered name, or a RegistryError."""
        self._collect()
        section, selector = KINDS[kind]
        claims = self._default_claims[kind]
        known = ", ".join(sorted(self._components[kind])) or "(none)"
        if not claims:
            raise RegistryError(f"{section}.{selector} is unset and no installed plugin declares a default "
                                f"{kind}; set it to one of: {known}")
        if len(claims) > 1:
            who = " and ".join(f"{n!r} by plugin {p.name!r} ({p.distribution or 'in-process'})" for n, p in claims)
            raise RegistryError(f"{section}.{selector} is unset and {len(claims)} plugins declare its default: "
                                f"{who}; set {section}.{selector} explicitly, or uninstall one of them")
        name, info = claims[0]
        if name not in self._components[kind]:
            raise RegistryError(f"{section}.{selector} is unset and its declared default {name!r} (plugin "
                                f"{info.name!r}) is not registered by any installed plugin; set it to one of: {known}")
        return name

    def get(self, kind: str, name: str) -> Component:
        """Component ``name`` of ``kind``; an empty name is the kind's declared default."""
        if kind not in KINDS:
            raise RegistryError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        self._collect()
        if not name:
            name = self.default_name(kind)
        try:
            return self._components[kind][name]
        except KeyError:
            known = sorted(self._components[kind])
            section, selector = KINDS[kind]
            hint = difflib.get_close_matches(name, known, n=1)
            raise RegistryError(
                f"no {kind} named {name!r} ({section}.{selector}); registered: "
                f"{', '.join(known) or '(none)'}"
                + (f". Did you mean {hint[0]!r}?" if hint else "")
                + "".join(f". Not loaded: {why}" for _info, why in self._broken)
            ) from None

    def find_section_owner(self, section: str, name: str) -> Optional[Component]:
        """The component whose options table is ``[section.name]``, if any."""
        self._collect()
        for kind, (sec, _sel) in KINDS.items():
            if sec == section and name in self._components[kind]:
                return self._components[kind][name]
        return None

    def section_components(self, section: str) -> list[Component]:
        self._collect()
        return [c for kind, (sec, _) in KINDS.items() if sec == section for c in self._components[kind].values()]

    # ---------------------------------------------------------------------------- building
    def default_options(self, kind: str, name: str) -> Any:
        comp = self.get(kind, name)
        return comp.config_class() if comp.config_class is not None else None

    def create(self, kind: str, name: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Build component ``name`` of ``kind``: ``factory(options, *args, **kwargs)``."""
        comp = self.get(kind, name)
        if options is None and comp.config_class is not None:
            options = comp.config_class()
        built = comp.factory(options, *args, **kwargs)
        check(built, comp)
        return built

    def selected_name(self, config: Any, kind: str) -> str:
        """The name of the component ``config`` selects for ``kind`` (its declared default when
        the selector is empty)."""
        return selected(config, kind) or self.default_name(kind)

    def create_for(self, config: Any, kind: str, *args: Any, **kwargs: Any) -> Any:
        """Build the component the config selects for ``kind``, with its options from the config."""
        name = self.selected_name(config, kind)
        return self.create(kind, name, config.options(KINDS[kind].section, name), *args, **kwargs)


def check(built: Any, comp: Component) -> None:
    """``built`` (what ``comp``'s factory returned) against its kind's contract: a RegistryError of
    one line naming the plugin, the component and the member."""
    problems = conformance_problems(built, KINDS[comp.kind].contract)
    if problems:
        raise RegistryError(f"plugin {comp.plugin.name!r}: {comp.kind} {comp.name!r} "
                            f"({type(built).__name__}) {'; '.join(problems)}")


_REGISTRY: Optional[Registry] = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, with every installed entry-point plugin loaded."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        reg = Registry()
        reg.load_entry_points()
        _REGISTRY = reg
    return _REGISTRY


def registry_from(plugins: Iterable[tuple[str, Any]], with_entry_points: bool = True) -> Registry:
    """A fresh registry with extra in-process plugins (for tests and programmatic use)."""
    reg = Registry()
    if with_entry_points:
        reg.load_entry_points()
    for name, plugin in plugins:
        reg.register_plugin(plugin, name)
    return reg
