-- Argo CD health for apiward.io/ApiPolicy. Install it under
-- resource.customizations.health.apiward.io_ApiPolicy in the argocd-cm ConfigMap
-- (see the README). It reads the conditions the operator writes, for the current
-- generation only.
local hs = {status = "Progressing", message = "waiting for the apiward operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "status is for generation " .. tostring(obj.status.observedGeneration)
  return hs
end
local by = {}
for _, c in ipairs(obj.status.conditions) do
  by[c.type] = c
end
if by["Stalled"] ~= nil and by["Stalled"].status == "True" then
  return {status = "Degraded", message = by["Stalled"].message}
end
if by["Ready"] ~= nil and by["Ready"].status == "True" then
  local p = by["Programmed"]
  return {status = "Healthy", message = p and p.message or "enforced"}
end
if by["Reconciling"] ~= nil then
  hs.message = by["Reconciling"].message
elseif by["Ready"] ~= nil then
  hs.message = by["Ready"].message
end
return hs
